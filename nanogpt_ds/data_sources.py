"""
The training data, checked before a run spends anything on it: train_deepspeed.py's `dataset` is one name
(data/<name>/ or a folder path) or a mix {name: weight}. Each folder holds train.bin and val.bin (uint16
token ids, as nanoGPT's prepare.py scripts write them) and, for a character-level vocabulary, meta.json.

A vocabulary is data, and a dataset folder may come from anyone: it is JSON, and an old meta.pkl (nanoGPT's,
or ours before) is read as plain data only, so that no file of a dataset runs code on the ranks that read it.
"""
import json
import os
import pickle

import numpy as np

from nanogpt_ds import PROJECT

VOCABULARY = 'meta.json'  # a character vocabulary: what write_meta writes, what read_meta reads first
OLD_VOCABULARY = 'meta.pkl'  # nanoGPT's pickle of the same dict: still read, as plain data only


def folder(name):
    """The folder of a dataset name: a path as given, a bare name under data/ beside this file."""
    return name if os.sep in name else os.path.join(PROJECT, 'data', name)


def vocabulary_file(where):
    """A folder's vocabulary file: its meta.json, else an old meta.pkl; '' when it has neither (GPT-2 BPE)."""
    for name in (VOCABULARY, OLD_VOCABULARY):
        path = os.path.join(where, name)
        if os.path.isfile(path):
            return path
    return ''


def write_meta(where, meta):
    """Write a vocabulary (read_meta's dict) as where/meta.json and return its path; a file that already holds
    it is left as it is (a resumed run does not touch the copy its out_dir kept). JSON keys are strings, so
    itos goes as a list (its ids are 0..n-1): read back, it is the same {int: str} dict."""
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f'not a vocabulary: {problem}')
    data = dict(meta)
    if 'itos' in data:
        data['itos'] = [meta['itos'][i] for i in range(len(meta['itos']))]
    path, text = os.path.join(where, VOCABULARY), json.dumps(data)
    if os.path.isfile(path) and open(path, encoding='utf-8', errors='replace').read() == text:
        return path
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(path + '.tmp', path)  # every rank reads it: never half-written
    return path


def read_meta(path):
    """The vocabulary in a meta.json or an old meta.pkl: 'vocab_size', and for characters 'itos' {id: str},
    'stoi' {str: id} and (data/prepare.py's) 'separator'. None when path is no file: the data is GPT-2 BPE.
    ValueError naming the file and the fix when it holds no usable vocabulary."""
    if not path or not os.path.isfile(path):
        return None
    as_json = path.endswith('.json')
    try:
        meta = read_json_meta(path) if as_json else read_pickled_meta(path)
    except Exception as e:  # not JSON, not a pickle, truncated, or a pickle that would import or call code
        reason = str(e).splitlines()[0][:160] if str(e) else 'no more said'
        problem = f"{type(e).__name__} reading it as {'JSON' if as_json else 'a pickle'}: {reason}"
    else:
        problem = meta_problem(meta)
    if problem:
        raise ValueError(f'{path} is not a usable vocabulary ({problem}): {how_to_remake(path)}')
    return meta


def read_json_meta(path):
    with open(path, encoding='utf-8') as f:
        meta = json.load(f)
    if isinstance(meta, dict) and isinstance(meta.get('itos'), list):
        meta['itos'] = dict(enumerate(meta['itos']))  # write_meta's list, back to nanoGPT's dict
    return meta


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, numbers, bools and None, nothing else: a pickle runs code by
    naming a global (a function to call, a class to build), and here every global is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'it names {module}.{name}; only plain data is read, nothing is run')


def read_pickled_meta(path):
    with open(path, 'rb') as f:
        return DataOnlyUnpickler(f).load()


def meta_problem(meta):
    """What keeps meta from being a vocabulary the codecs and the model can use; '' when nothing does."""
    if not isinstance(meta, dict):
        return f'it holds a {type(meta).__name__}, not a dict'
    size = meta.get('vocab_size')
    if type(size) is not int or not 0 < size <= 2 ** 16:
        return f'vocab_size is {size!r}, not a number of uint16 token ids'
    if 'itos' not in meta and 'stoi' not in meta:
        return ''  # a size alone: ids without characters
    itos = meta.get('itos')
    if not isinstance(itos, dict) or set(itos) != set(range(len(itos))) or len(itos) > size:
        return f'itos is not {{id: character}} for the ids 0 to {size - 1}'
    characters = all(isinstance(c, str) for c in itos.values())
    if not characters or meta.get('stoi') != {c: i for i, c in itos.items()}:
        return 'stoi is not the inverse of itos'
    separator = meta.get('separator')
    if separator is not None and (type(separator) is not int or separator not in itos):
        return f'separator {separator!r} is not one of its ids'
    return ''


def how_to_remake(path):
    """The fix for a vocabulary file that cannot be read: prepare its dataset again, or (an out_dir's or an
    export's copy) copy in its dataset's."""
    where = os.path.dirname(path) or '.'
    if os.path.isfile(os.path.join(where, 'train.bin')):
        return f'write the vocabulary again with {how_to_prepare(where, tokenizer="char")}'
    return (f'replace it with the {VOCABULARY} of the dataset the model was trained on (data/prepare.py '
            '--tokenizer char writes one)')


def resolve(dataset, block_size):
    """{name: (folder, weight)} with weights summing to 1, every file checked; ValueError says what to fix."""
    mix = dataset if isinstance(dataset, dict) else {dataset: 1.0}
    if not mix:
        raise ValueError("dataset={} names no data: give a name, or a mix like {'a': 0.7, 'b': 0.3}")
    bad = [f'{k}: {w!r}' for k, w in mix.items()
           if not isinstance(k, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0]
    if bad:
        raise ValueError(f"dataset mix {dataset!r}: {', '.join(bad)}; each entry is 'name': a weight > 0")
    total = sum(mix.values())
    sources = {}
    for name, weight in mix.items():
        where = folder(name)
        for split in ('train', 'val'):
            check_bin(os.path.join(where, f'{split}.bin'), block_size, how_to_prepare(where))
        sources[name] = (where, weight / total)
    vocabs = {name: vocabulary(where) for name, (where, _) in sources.items()}
    first = next(iter(vocabs))
    for name, vocab in vocabs.items():
        if vocab != vocabs[first]:
            raise ValueError(f'{name} and {first} use different tokenizers ({describe(vocab)} vs '
                             f'{describe(vocabs[first])}): a mix needs one vocabulary; '
                             'prepare them with the same one')
    return sources


def how_to_prepare(where, tokenizer=''):
    """The command that makes a dataset folder, as typed in the project's root: its own prepare.py (the
    Shakespeare ones), else data/prepare.py (with --tokenizer, when given) and the dataset's name."""
    own = os.path.join(where, 'prepare.py')
    if os.path.isfile(own):
        return f'python {typeable(own)}'
    option = f' --tokenizer {tokenizer}' if tokenizer else ''
    under_data = os.path.dirname(os.path.abspath(where)) == os.path.join(PROJECT, 'data')
    name = os.path.basename(where) if under_data else typeable(where)  # folder()'s rule, the other way
    return f'python data/prepare.py YOUR_FILES --name {name}{option}'


def typeable(path):
    """A path as a user types it in the project's root: relative to it when inside it, else as given."""
    inside = os.path.abspath(path).startswith(PROJECT + os.sep)
    return os.path.relpath(os.path.abspath(path), PROJECT) if inside else path


def check_bin(path, block_size, prepare):
    if not os.path.isfile(path):
        raise ValueError(f'{typeable(path)} not found: run {prepare}')
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f'{typeable(path)} has {size:,} bytes, an odd number: it is not uint16 token ids; '
                         f'make it again with {prepare}')
    if size // 2 < block_size + 1:
        raise ValueError(f'{typeable(path)} holds {size // 2:,} tokens, fewer than block_size + 1 = '
                         f'{block_size + 1}: use more text or a smaller --block_size')


def vocabulary(where):
    """The character vocabulary of a folder (its stoi), or None for GPT-2 BPE (no vocabulary file)."""
    meta = read_meta(vocabulary_file(where))
    if meta is None:
        return None
    return meta.get('stoi') or dict.fromkeys(range(meta['vocab_size']))  # no symbols saved: compare the sizes


def describe(vocab):
    return 'GPT-2 BPE' if vocab is None else f'a vocabulary of {len(vocab)} symbols'


def check_token_ids(sources, vocab_size, chunks=64, chunk_tokens=16384):
    """Every id must be < vocab_size, or the embedding lookup fails deep in a run (or silently on some GPUs):
    first the vocabulary's size, then up to chunks x chunk_tokens ids spread over each file, not
    the whole file."""
    first_folder = next(iter(sources.values()))[0] if sources else ''
    meta = read_meta(vocabulary_file(first_folder))  # a mix shares one vocabulary
    if meta and meta['vocab_size'] > vocab_size:
        names = ', '.join(sources)
        raise ValueError(f"{names} has {meta['vocab_size']} token ids, the model only {vocab_size}")
    for where, _ in sources.values():
        for split in ('train', 'val'):
            path = os.path.join(where, f'{split}.bin')
            data = np.memmap(path, dtype=np.uint16, mode='r')
            starts = np.unique(np.linspace(0, max(0, len(data) - chunk_tokens), chunks).astype(np.int64))
            for start in starts:
                chunk = data[start:start + chunk_tokens]
                if chunk.max() >= vocab_size:
                    at = int(start + np.argmax(chunk >= vocab_size))
                    raise ValueError(f'{path} holds token id {int(data[at])} (at token {at:,}) '
                                     f'but the model has {vocab_size} ids: the data was made with another '
                                     'tokenizer; prepare it again for this model, or train one with a '
                                     'matching vocabulary')
