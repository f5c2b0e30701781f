"""
nanoGPT-style overrides: `python train_deepspeed.py config/x.py --batch_size=4`. A config file is Python
run in its own namespace; --key=value is a Python literal (a bare word stays a string). Values keep the
constant's type (an int may stand for a float); an unknown key is refused with the nearest valid one.
A script's settings are its settings block: the lowercase top-level assignments above the line where it
applies its overrides, with the comment beside each; --help prints that block (answer_help), so a new
setting documents itself. A script may let named text settings also take one other type
(train_deepspeed.py: a dict for dataset={'a': 0.7, 'b': 0.3}, a bool for compile='auto'), and a setting
may follow another unless given (FOLLOW).
--local_rank=N, which the deepspeed launcher appends, is ignored (LOCAL_RANK is in the environment).
"""
import ast
import glob
import io
import os
import sys
import tokenize

ALSO = {'dataset': dict, 'compile': bool}  # train_deepspeed.py's text settings that take another type too
# train_deepspeed.py's settings that are usually another one's value: unless given (in a config file or on the
# command line) they follow it when it is given. setting -> (the one it follows, divided by)
FOLLOW = {'lr_decay_iters': ('max_iters', 1), 'min_lr': ('learning_rate', 10)}
HELP_FLAGS = ('--help', '-h')


def settings_block(script):
    """[(name, value as written, comment)] for each setting of a script, and (None, None, comment) for each
    comment line among them (a section's title), read from its source alone, nothing run. The block ends
    where the script applies its overrides (its `from configurator import configure`) or defines something."""
    source = open(script).read()
    comments = {token.start[0]: token.string.lstrip('#').strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    entries, last_line = [], 0
    lines = source.encode().splitlines(keepends=True)  # ast's columns count bytes
    for node in ast.parse(source).body:
        applies_overrides = isinstance(node, ast.ImportFrom) and node.module == 'configurator' and any(
            alias.name == 'configure' for alias in node.names)
        if applies_overrides or isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.With)):
            break
        is_setting = isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if not is_setting or not node.targets[0].id.islower():
            last_line = node.end_lineno
            continue
        for line in range(last_line + 1, node.lineno):  # comment lines above it: a section's title
            title = comments.get(line, '')
            if title and not title.startswith('---'):
                entries.append((None, None, title))
        value = value_text(lines, node.value)
        entries.append((node.targets[0].id, value, comments.get(node.end_lineno, '')))
        last_line = node.end_lineno
    return entries


def value_text(lines, node):
    """A node's source as written, from the source's lines split once (ast.get_source_segment splits the
    whole source at every call: 0.2 s of every trainer start on 59 settings)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset:node.end_col_offset].decode()
    middle = b''.join(lines[first + 1:last])
    return (lines[first][node.col_offset:] + middle + lines[last][:node.end_col_offset]).decode()


def constants_of(script):
    """A script's settings as written, from its source alone (nothing run): those whose value is a literal."""
    constants = {}
    for name, value, _ in settings_block(script):
        if name:
            try:
                constants[name] = ast.literal_eval(value)
            except ValueError:
                pass  # e.g. sample.py's device, which asks torch
    return constants


def help_text(script):
    """--help: the script's docstring, its settings with their defaults and comments, the config files made
    for it, and how overrides are written."""
    name = os.path.relpath(script)
    doc = ast.get_docstring(ast.parse(open(script).read())) or ''
    block = settings_block(script)
    width = min(48, max(len(f'--{key}={value}') for key, value, _ in block if key))
    lines = [doc, '', f'usage: python {name} [CONFIG_FILE ...] [--key=value ...]',
             'A config file is Python that sets some of the settings below; --key=value then sets one '
             '(a Python literal;', 'a bare word is text). Settings and their defaults:']
    for key, value, comment in block:
        if key is None:
            lines.append(f'  # {comment}')
            continue
        setting = f'--{key}={value}'
        lines.append(f'  {setting:<{width}}  {comment}'.rstrip())
    configs = config_files(script, {key for key, _, _ in block if key})
    if configs:
        lines += ['', f'config files for {name}:']
        lines += [f'  {path}  {title}' for path, title in configs]
    return '\n'.join(lines)


def config_files(script, settings):
    """[(path, its first comment line)] for the files under config/ that set only this script's settings."""
    found = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(script)), 'config', '*.py'))):
        source = open(path).read()
        names = {node.targets[0].id for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
        if names and names <= settings:
            first = next((line for line in source.splitlines() if line.startswith('#')), '')
            found.append((os.path.relpath(path), first.lstrip('#').strip()))
    return found


def answer_help(script, argv=None):
    """--help or -h anywhere in the arguments: print the script's help and exit 0, before anything loads."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(script))
        sys.exit(0)


def _check(key, value, defaults, source, also=None):
    where = f'{source}: ' if source else ''
    if key not in defaults:
        import difflib
        nearest = difflib.get_close_matches(key, defaults, n=1, cutoff=0.6)
        guess = f': did you mean {nearest[0]}?' if nearest else ''
        raise ValueError(f"{where}unknown key '{key}'{guess} (--help lists them all)")
    if key in (also or {}) and type(value) is also[key]:
        return value
    want = type(defaults[key])
    value = float(value) if want is float and type(value) is int else value
    if type(value) is not want:
        raise ValueError(f'{where}{key}={value!r} is {type(value).__name__}, '
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
            written = f'--{key}=True' if isinstance(defaults.get(key), bool) else '--key=value'
            raise ValueError(f"'{arg}': overrides are written {written} (--help lists the keys)")
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw
        text_setting = isinstance(defaults.get(key), str)
        if text_setting and not isinstance(value, str) and type(value) is not also.get(key):
            value = raw  # a text setting takes the text as written: --stages=0,2 is '0,2', not a tuple
        out[key] = _check(key, value, defaults, None, also)
    return out


def follow(namespace, given):
    """Each FOLLOW setting not given takes the value of the one it follows, when that one is given: e.g.
    --max_iters=2000 alone decays the learning rate over 2000 iterations, not the default's 20. Returns a line
    naming what followed ('' when nothing did)."""
    followed = []
    for setting, (leader, divisor) in FOLLOW.items():
        if setting in namespace and setting not in given and leader in given:
            value = type(namespace[setting])(namespace[leader] / divisor)
            if value == namespace[setting]:
                continue  # nothing to say: the default already was that
            namespace[setting] = value
            rule = leader if divisor == 1 else f'{leader} / {divisor}'
            followed.append(f'{setting}={namespace[setting]:g} (= {rule})')
    return f"following the settings given: {', '.join(followed)}" if followed else ''


def configure(namespace, argv=None, also=ALSO, script=None):
    """Apply overrides to a script's settings (settings_block); bad input: one line, exit 2. Returns the
    settings' names, the overrides that were applied, and a line naming the settings that followed another."""
    argv = sys.argv[1:] if argv is None else argv
    script = script or namespace['__file__']
    answer_help(script, argv)
    keys = [key for key, _, _ in settings_block(script) if key]
    defaults = {key: namespace[key] for key in keys if key in namespace}  # __main__: the literal ones
    try:
        overrides = parse_overrides(argv, defaults, also)
    except ValueError as e:
        from nanogpt_ds.settings import die
        die(str(e), exit_code=2)
    namespace.update(overrides)
    return keys, overrides, follow(namespace, overrides)


# `python configurator.py train_deepspeed.py [args]`: the resolved constants as JSON, nothing run
if __name__ == '__main__':
    import json
    constants = constants_of(sys.argv[1])
    configure(constants, sys.argv[2:], script=sys.argv[1])
    print(json.dumps(constants))
