"""The prepared Shakespeare data and the offline GPT-2 tokenizer: real files, real tiktoken."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from nanogpt_ds import data_sources
from nanogpt_ds.tokenizer import EOT_TOKEN, gpt2_encoding, load_codec, prompt_ids


def bins(name):
    folder = os.path.join(REPO, 'data', name)
    return [np.memmap(os.path.join(folder, f'{s}.bin'), dtype=np.uint16, mode='r') for s in ('train', 'val')]


def test_gpt2_bpe_offline():
    enc = gpt2_encoding()
    assert enc.encode('Hello world') == [15496, 995] and enc.n_vocab == 50257
    assert enc.decode(enc.encode('To be, or not to be')) == 'To be, or not to be'


def test_char_level_data():
    train, val = bins('shakespeare_char')
    assert abs(len(train) / (len(train) + len(val)) - 0.9) < 1e-3  # 90/10 split
    meta_path = data_sources.vocabulary_file(data_sources.folder('shakespeare_char'))
    meta = data_sources.read_meta(meta_path)
    assert meta['vocab_size'] == len(meta['itos']) == len(meta['stoi'])
    assert int(train.max()) < meta['vocab_size']
    encode, decode = load_codec(meta_path)
    text = decode(train[:20000].tolist())
    assert 'the' in text and encode(text[:500]) == train[:500].tolist()


def test_an_empty_prompt_starts_a_document(tmp_path):
    """prompt_ids: '' is GPT-2's end of text, or a character vocabulary's separator; nanoGPT's vocabulary has
    none and says so."""
    assert prompt_ids(load_codec()[0], '') == [EOT_TOKEN]
    char_meta = data_sources.vocabulary_file(data_sources.folder('shakespeare_char'))
    meta = data_sources.read_meta(char_meta)
    assert prompt_ids(load_codec(char_meta)[0], '') == [meta['separator']]
    nanogpt_meta = data_sources.write_meta(tmp_path, {k: meta[k] for k in ('vocab_size', 'stoi', 'itos')})
    with pytest.raises(ValueError, match='no document separator'):
        prompt_ids(load_codec(nanogpt_meta)[0], '')


def test_bpe_data_decodes_to_shakespeare():
    train, val = bins('shakespeare')
    assert abs(len(train) / (len(train) + len(val)) - 0.9) < 1e-3
    assert int(train.max()) < 50257
    text = gpt2_encoding().decode(train[:5000].tolist())
    assert sum(w in text for w in (' thou ', ' the ', ' my lord')) >= 2
    # BPE: no char vocabulary
    assert not data_sources.vocabulary_file(data_sources.folder('shakespeare'))


def test_prepare_from_a_local_file(tmp_path):
    """--input works, here on a copy of the char script (and of data/prepare.py, which it hands the text to)
    run in a scratch folder so the real data stays: one document, 1000 characters and the separator, split
    900 / 101."""
    work = tmp_path / 'data'
    (work / 'shakespeare_char').mkdir(parents=True)
    src = os.path.join(REPO, 'data')
    for f in ('shakespeare_text.py', 'prepare.py', 'corpus_reading.py', 'dataset_joining.py',
              os.path.join('shakespeare_char', 'prepare.py')):
        (work / f).write_text(open(os.path.join(src, f)).read())
    (tmp_path / 'in.txt').write_text('abcab' * 200)
    prepare = work / 'shakespeare_char' / 'prepare.py'
    proc = subprocess.run([sys.executable, str(prepare), '--input', str(tmp_path / 'in.txt')],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    train = np.fromfile(work / 'shakespeare_char' / 'train.bin', dtype=np.uint16)
    val = np.fromfile(work / 'shakespeare_char' / 'val.bin', dtype=np.uint16)
    assert len(train) == 900 and len(val) == 101 and train[:5].tolist() == [0, 1, 2, 0, 1]
    assert val[-1] == 3  # the separator, after a, b and c


@pytest.mark.parametrize('given', ['name', 'data/name'])
def test_a_missing_dataset_names_the_command_that_makes_it(tmp_path, given):
    """The error's command is typed as a user would (the dataset's name, not an absolute path) and, pasted in
    the project's root with YOUR_FILES replaced by a text file, makes the dataset the run asked for."""
    name = f'pasted_hint_{os.getpid()}'
    dataset = given.replace('name', name)
    try:
        with pytest.raises(ValueError) as refused:
            data_sources.resolve(dataset, 8)
        line = str(refused.value)
        assert line == f'data/{name}/train.bin not found: run python data/prepare.py YOUR_FILES --name {name}'
        (tmp_path / 'mine.txt').write_text('Some text of my own, long enough for a few windows.\n' * 40)
        pasted = line.split('run ', 1)[1].replace('YOUR_FILES', str(tmp_path / 'mine.txt'))
        made = subprocess.run([sys.executable, *pasted.split()[1:]], cwd=REPO, capture_output=True,  # python
                              text=True)
        assert made.returncode == 0, made.stderr
        assert list(data_sources.resolve(dataset, 8)) == [dataset]
    finally:
        shutil.rmtree(os.path.join(REPO, 'data', name), ignore_errors=True)
