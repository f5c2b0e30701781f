"""
nanoGPT-style overrides: `python train_deepspeed.py config/x.py --batch_size=4`. A config file is Python
run in its own namespace; --key=value is a Python literal (a bare word stays a string). Values keep the
constant's type (an int may stand for a float); unknown keys are refused with the valid ones listed.
A script may let named text settings also take one other type (train_deepspeed.py: a dict for
dataset={'a': 0.7, 'b': 0.3}, a bool for compile='auto').
--local_rank=N, which the deepspeed launcher appends, is ignored (LOCAL_RANK is in the environment).
"""
import ast
import os
import sys

ALSO = {'dataset': dict, 'compile': bool}  # train_deepspeed.py's text settings that take another type too


def _check(key, value, defaults, source, also=None):
    if key not in defaults:
        raise ValueError(f"{source}: unknown key '{key}'; valid keys: {', '.join(sorted(defaults))}")
    if key in (also or {}) and type(value) is also[key]:
        return value
    want = type(defaults[key])
    value = float(value) if want is float and type(value) is int else value
    if type(value) is not want:
        raise ValueError(f'{source}: {key}={value!r} is {type(value).__name__}, '
                         f'expected {want.__name__} like the default {defaults[key]!r}')
    return value


def parse_overrides(argv, defaults, also=None):
    """{key: value} from config files and --key=value; also: {text setting: the other type it takes}."""
    also = also or {}
    out = {}
    for arg in (a for a in argv if not a.startswith('--local_rank')):
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ValueError(f"config file '{arg}' not found (overrides are written --key=value)")
            namespace = {}
            exec(compile(open(arg).read(), arg, 'exec'), namespace)
            out.update({k: _check(k, v, defaults, arg, also) for k, v in namespace.items()
                        if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module'})
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            raise ValueError(f"'{arg}': overrides are written --key=value")
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw
        text_setting = isinstance(defaults.get(key), str)
        if text_setting and not isinstance(value, str) and type(value) is not also.get(key):
            value = raw  # a text setting takes the text as written: --stages=0,2 is '0,2', not a tuple
        out[key] = _check(key, value, defaults, arg, also)
    return out


def configure(namespace, argv=None, also=ALSO):
    """Apply overrides to a script's constants (its int/float/bool/str globals); bad input: one line, exit 2.
    Returns the constants' names and the overrides that were applied."""
    defaults = {k: v for k, v in namespace.items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
    try:
        overrides = parse_overrides(sys.argv[1:] if argv is None else argv, defaults, also)
    except ValueError as e:
        from ds_setup import die  # only now: it loads torch, which `python configurator.py` needs not
        die(str(e), exit_code=2)
    namespace.update(overrides)
    return list(defaults), overrides


def constants_of(script):
    """A script's constants as written, from its source alone (nothing run): the literal assignments above the
    line where it applies its overrides."""
    constants = {}
    for node in ast.parse(open(script).read()).body:
        if isinstance(node, ast.ImportFrom) and node.module == 'configurator':
            break  # the constants end where the script applies its overrides
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return constants


# `python configurator.py train_deepspeed.py [args]`: the resolved constants as JSON, nothing run
if __name__ == '__main__':
    import json
    constants = constants_of(sys.argv[1])
    configure(constants, sys.argv[2:])
    print(json.dumps(constants))
