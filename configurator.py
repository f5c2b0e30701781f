"""
Overrides for the constants at the top of a script, nanoGPT style:
    python train_deepspeed.py config/some_file.py --batch_size=4 --dtype=bfloat16
A config file is plain Python run in its own namespace; --key=value parses value as a Python literal
(a bare word stays a string). Each value must have the type of the constant it replaces (an int may
stand for a float); unknown keys are refused with the list of valid ones. --local_rank=N, which the
deepspeed launcher appends, is accepted and ignored (LOCAL_RANK is in the environment too).
"""
import os
import sys
from ast import literal_eval


def _check(key, value, defaults, source):
    if key not in defaults:
        raise ValueError(f"{source}: unknown key '{key}'; valid keys: {', '.join(sorted(defaults))}")
    want = type(defaults[key])
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ValueError(f"{source}: {key}={value!r} is {type(value).__name__}, expected {want.__name__} "
                         f"like the default {defaults[key]!r}")
    return value


def parse_overrides(argv, defaults):
    """Returns {key: value} from config files and --key=value in argv, checked against defaults."""
    out = {}
    for arg in argv:
        if arg.startswith('--local_rank'):
            continue
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ValueError(f"config file '{arg}' not found (overrides are written --key=value)")
            namespace = {}
            exec(compile(open(arg).read(), arg, 'exec'), namespace)
            for k, v in namespace.items():
                if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module':
                    out[k] = _check(k, v, defaults, arg)
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            raise ValueError(f"'{arg}': overrides are written --key=value")
        try:
            value = literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw
        out[key] = _check(key, value, defaults, arg)
    return out


def configure(namespace, argv=None):
    """Apply overrides to a script's globals; on bad input print one line and exit 2."""
    defaults = {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
    try:
        overrides = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
    except ValueError as e:
        if os.environ.get('RANK', '0') == '0':
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    namespace.update(overrides)
    return list(defaults)


if __name__ == '__main__':
    # python configurator.py train_deepspeed.py [config/x.py] [--key=value ...] prints the resolved
    # settings as JSON without running the script: run_deepspeed_xl.sh checks what it will launch
    import ast
    import json
    settings = {}
    for node in ast.parse(open(sys.argv[1]).read()).body:
        if isinstance(node, ast.ImportFrom) and node.module == 'configurator':
            break  # the constants end where the script applies its overrides
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    configure(settings, sys.argv[2:])
    print(json.dumps(settings))
