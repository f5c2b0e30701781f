"""data/prepare.py: a corpus (files, folders, globs; plain text, JSON Lines, gzip) to train.bin and val.bin,
split by document, each document ended by an end-of-text id. The work is cut into units that do not depend on
--num_proc, so neither do the bytes; a text file cut into units tokenizes as the whole text does. Bad input is
skipped and summed up, or, where nothing usable is left, one 'error:' line. Most cases run prepare in this
process (main() raises the ValueError that the command prints as its error line); two run the command, and
one trains on what it wrote (a world of one: the data a rank reads does not depend on how many there are)."""
import gzip
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import BIN, REPO, TINY, env, metrics, ok, one_error, run, snapshot

from nanogpt_ds import data_sources
from nanogpt_ds.tokenizer import EOT_TOKEN, gpt2_encoding, load_codec

PREPARE = os.path.join(REPO, 'data', 'prepare.py')
_spec = importlib.util.spec_from_file_location('prepare', PREPARE)
prepare = importlib.util.module_from_spec(_spec)
sys.modules['prepare'] = prepare  # worker processes find its functions by this name
_spec.loader.exec_module(prepare)
# its reading of inputs (units, chunks), from data/, which prepare put on the path: the tests shrink its sizes
reading = importlib.import_module('corpus_reading')

WORDS = 'the of and to a in that is was he for it with as his on be at by i this had not are but from'.split()


def make_documents(count, seed=0, lines=3):
    """Different documents of a few lines of words each, every one ending with a line end."""
    rng = random.Random(seed)
    documents = []
    for n in range(count):
        body = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + '.'
                for _ in range(lines)]
        documents.append(f'Document {n}.\n' + '\n'.join(body) + '\n')
    return documents


def shakespeare(characters):
    """The start of data/shakespeare_char's text, decoded from its train.bin."""
    folder = os.path.join(REPO, 'data', 'shakespeare_char')
    _, decode = load_codec(data_sources.vocabulary_file(folder))  # meta.json, or one prepared before it
    ids = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16)[:characters]
    return decode(ids.tolist())


def write_jsonl(path, records):
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'wt', encoding='utf-8') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def corpus(root, documents):
    """The documents spread over every kind of input: plain text in nested folders, gzip text, JSON Lines
    and gzip JSON Lines. The inputs that name them: a folder, a file and a glob."""
    (root / 'texts' / 'more').mkdir(parents=True)
    for i, text in enumerate(documents[:6]):
        (root / 'texts' / ('more' if i % 2 else '') / f'{i}.txt').write_text(text)
    with gzip.open(root / 'texts' / 'packed.txt.gz', 'wt', encoding='utf-8') as f:
        f.write(documents[6])
    write_jsonl(root / 'lines.jsonl', [{'text': t, 'id': i} for i, t in enumerate(documents[7:20])])
    (root / 'globbed').mkdir()
    write_jsonl(root / 'globbed' / 'a.jsonl.gz', [{'text': t} for t in documents[20:]])
    return [root / 'texts', root / 'lines.jsonl', str(root / 'globbed' / '*.jsonl.gz')]


def prepare_main(*args):
    return prepare.main([str(a) for a in args])


def split_documents(folder, split, end_of_text, decode):
    """The documents of a split: its ids cut after each end-of-text id, decoded. The split ends with one."""
    ids = np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=np.uint16).tolist()
    assert ids and ids[-1] == end_of_text
    documents, start = [], 0
    for at, token in enumerate(ids):
        if token == end_of_text:
            documents.append(decode(ids[start:at]))
            start = at + 1
    return documents


def gpt2_documents(folder, split):
    return split_documents(folder, split, EOT_TOKEN, gpt2_encoding().decode)


def read_json(folder):
    with open(os.path.join(folder, 'prepare.json')) as f:
        return json.load(f)


def test_every_document_comes_back_once_whole_in_one_split(tmp_path):
    """GPT-2 BPE: train.bin and val.bin decode to every document of every kind of input exactly once, each
    in one split and followed by 50256; prepare.json counts them; no meta.json (that is how the trainer knows
    BPE); nothing is left beside the dataset."""
    documents = make_documents(30)
    dest = tmp_path / 'ds'
    inputs = corpus(tmp_path, documents)
    summary = prepare_main(*inputs, '--name', dest, '--val_fraction', 0.3, '--num_proc', 1)
    train, val = gpt2_documents(dest, 'train'), gpt2_documents(dest, 'val')
    assert sorted(train + val) == sorted(documents)
    assert train and val
    assert summary == read_json(dest)
    assert summary['splits']['train']['documents'] == len(train)
    assert summary['splits']['val']['documents'] == len(val)
    assert summary['splits']['val']['tokens'] == os.path.getsize(dest / 'val.bin') // 2
    assert summary['tokenizer'] == 'gpt2' and summary['end_of_text'] == EOT_TOKEN
    assert len(summary['sources']) == 9 and summary['skipped']['documents'] == 0
    assert sorted(os.listdir(dest)) == ['prepare.json', 'train.bin', 'val.bin']
    assert sorted(os.listdir(tmp_path)) == ['ds', 'globbed', 'lines.jsonl', 'texts']  # no ds.partial


def test_character_vocabulary_with_a_separator(tmp_path):
    """--tokenizer char: meta.json holds every character of the corpus in sorted order (ids 0..n-1, as
    data/shakespeare_char has them) and a separator id n of its own that decodes as <|endoftext|>; the splits
    decode back to the documents, each ended by it. It is JSON, not nanoGPT's pickle: no dataset runs code."""
    documents = ['Zebra crossing.\n', 'été à Paris\n', 'tab\there\n', 'naïve café ✓\n']
    for i, text in enumerate(documents):
        (tmp_path / f'{i}.txt').write_text(text)
    dest = tmp_path / 'chars'
    summary = prepare_main(tmp_path / '*.txt', '--name', dest, '--tokenizer', 'char', '--num_proc', 1)
    assert sorted(os.listdir(dest)) == ['meta.json', 'prepare.json', 'train.bin', 'val.bin']
    meta = data_sources.read_meta(str(dest / 'meta.json'))
    chars = sorted(set(''.join(documents)))
    separator = len(chars)
    assert meta['separator'] == separator == summary['end_of_text']
    assert meta['vocab_size'] == len(chars) + 1 == summary['vocab_size']
    assert meta['itos'] == {**dict(enumerate(chars)), separator: '<|endoftext|>'}
    assert meta['stoi'] == {ch: i for i, ch in meta['itos'].items()}

    def decode(ids):
        return ''.join(meta['itos'][i] for i in ids)
    found = [split_documents(dest, split, separator, decode) for split in ('train', 'val')]
    assert sorted(found[0] + found[1]) == sorted(documents)


def test_character_vocabulary_skips_what_it_left_out(tmp_path):
    """A document skipped in the vocabulary's pass (here whitespace only, with a character no kept document
    has) is skipped again when tokenizing, not looked up in the vocabulary that lacks its characters."""
    (tmp_path / 'a.txt').write_text('ab\n')
    (tmp_path / 'b.txt').write_text('ba\n')
    (tmp_path / 'c.txt').write_text('\u3000\n')  # an ideographic space: whitespace, past every kept character
    summary = prepare_main(tmp_path / '*.txt', '--name', tmp_path / 'ds', '--tokenizer', 'char')
    assert summary['skipped']['reasons'] == {'empty': {'count': 1, 'first': [str(tmp_path / 'c.txt')]}}
    assert summary['vocab_size'] == 4  # \n, a, b and the separator


def test_character_codec_round_trips_the_separator(tmp_path):
    """A prompt for a character vocabulary (sample.py's --start) may hold <|endoftext|>, as a GPT-2 one may:
    it encodes to the separator's one id, not to its characters (here not in the vocabulary), and the
    separator decodes back to it."""
    (tmp_path / 'a.txt').write_text('ab\n')
    (tmp_path / 'b.txt').write_text('ba\n')
    prepare_main(tmp_path / '*.txt', '--name', tmp_path / 'ds', '--tokenizer', 'char')
    encode, decode = load_codec(str(tmp_path / 'ds' / 'meta.json'))
    separator = 3  # after \n, a and b
    prompt = '<|endoftext|>ab\n<|endoftext|>'
    assert encode(prompt) == [separator, 1, 2, 0, separator]
    assert decode(encode(prompt)) == prompt
    with pytest.raises(ValueError, match="'<' not in the vocabulary"):
        encode('a<b')


def test_text_cut_into_units_tokenizes_as_the_whole_text(tmp_path, monkeypatch):
    """A plain-text file bigger than a unit is cut into several, at line ends between printable characters,
    and read in chunks cut the same way: its tokens are exactly encode_ordinary(whole text) + 50256."""
    monkeypatch.setattr(reading, 'UNIT_BYTES', 8192)
    monkeypatch.setattr(reading, 'CHUNK_BYTES', 1024)
    text = shakespeare(60_000)
    (tmp_path / 'play.txt').write_text(text)
    (tmp_path / 'other.txt').write_text('Another document.\n')
    sources = prepare.find_sources([str(tmp_path)], lambda path: False)
    units = prepare.plan_units(sources)
    assert len(units) >= 7 and all(unit.part_of == 1 for unit in units[1:])  # other.txt, then play.txt
    prepare_main(tmp_path / 'play.txt', tmp_path / 'other.txt', '--name', tmp_path / 'ds', '--num_proc', 1)
    found = [np.fromfile(tmp_path / 'ds' / f'{split}.bin', dtype=np.uint16) for split in ('train', 'val')]
    found = np.concatenate(found).tolist()
    expected = gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]
    assert expected in (found[:len(expected)], found[-len(expected):])


def test_same_bytes_for_a_seed_whatever_num_proc(tmp_path, monkeypatch):
    """The split is by a hash of (seed, file, where the document starts), the units by the files alone: the
    same inputs and seed give byte-identical files with 1 or 2 processes, over packed small files, a JSON
    Lines file and a text file each cut into several units; another seed sends other documents to val."""
    monkeypatch.setattr(reading, 'UNIT_BYTES', 4096)
    monkeypatch.setattr(reading, 'CHUNK_BYTES', 1024)
    documents = make_documents(200, lines=2)
    inputs = corpus(tmp_path, documents[:40])
    write_jsonl(tmp_path / 'big.jsonl', [{'text': t} for t in documents[40:]])
    (tmp_path / 'big.txt').write_text(shakespeare(20_000))
    inputs += [tmp_path / 'big.jsonl', tmp_path / 'big.txt']
    units = prepare.plan_units(prepare.find_sources([str(i) for i in inputs], lambda path: False))
    assert sum(unit.part_of is not None for unit in units) >= 4  # big.txt
    assert sum(len(unit.spans) == 1 and unit.part_of is None for unit in units) >= 3  # big.jsonl
    outputs = {}
    for name, num_proc, seed in (('one', 1, 0), ('two', 2, 0), ('seed1', 2, 1)):
        prepare_main(*inputs, '--name', tmp_path / name, '--num_proc', num_proc, '--seed', seed)
        files = ('train.bin', 'val.bin', 'prepare.json')
        outputs[name] = {file: (tmp_path / name / file).read_bytes() for file in files}
    assert outputs['one'] == outputs['two']
    assert outputs['seed1']['val.bin'] != outputs['one']['val.bin']
    val_documents = read_json(tmp_path / 'one')['splits']['val']['documents']
    assert 5 <= val_documents <= 40  # about 10% of 202


def test_two_documents_give_one_to_each_split(tmp_path):
    """Where the hash sends every document to one split, the one nearest the line moves over, so two
    documents make a train and a val split, whatever val_fraction."""
    (tmp_path / 'a.txt').write_text('First document.\n')
    (tmp_path / 'b.txt').write_text('Second document.\n')
    for fraction in (0.001, 0.999):
        dest = tmp_path / f'ds{fraction}'
        summary = prepare_main(tmp_path / '*.txt', '--name', dest, '--val_fraction', fraction)
        assert [summary['splits'][s]['documents'] for s in ('train', 'val')] == [1, 1]
        assert summary['moved'].startswith('1 document from')
        assert sorted(gpt2_documents(dest, 'train') + gpt2_documents(dest, 'val')) == [
            'First document.\n', 'Second document.\n']


def test_one_document_is_split_by_its_tail(tmp_path):
    """A single text file (nanoGPT's Shakespeare): its first 90% of tokens train, the rest val."""
    text = ''.join(make_documents(20))
    (tmp_path / 'one.txt').write_text(text)
    summary = prepare_main(tmp_path / 'one.txt', '--name', tmp_path / 'one')
    whole = gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]
    train = np.fromfile(tmp_path / 'one' / 'train.bin', dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / 'one' / 'val.bin', dtype=np.uint16).tolist()
    assert train + val == whole and len(train) == int(len(whole) * 0.9)
    assert summary['splits']['val']['tokens'] == len(val) and 'its last' in summary['moved']


def test_bad_input_is_skipped_and_summed_up(tmp_path, monkeypatch, capsys):
    """Each kind of bad input is left out, counted per reason with its first places (file:line, or the file)
    in the printed summary and prepare.json, and everything else is kept: a JSON Lines line that does not
    parse, lacks the field, or whose field is not a string or not UTF-8; a text file that is not UTF-8
    (here a big one cut into units, bad in a later unit: the whole document goes), a binary file (a NUL byte
    early on) and an empty one."""
    monkeypatch.setattr(reading, 'UNIT_BYTES', 4096)
    monkeypatch.setattr(reading, 'CHUNK_BYTES', 1024)
    good = make_documents(5)
    lines = [json.dumps({'text': good[0]}), '{"text": "unterminated', json.dumps({'body': 'x'}),
             json.dumps({'text': 5}), json.dumps({'text': good[1]}), '', json.dumps({'text': 'caf'})[:-2]]
    lines[-1] = (lines[-1] + '\xe9"}').encode('latin-1')
    with open(tmp_path / 'records.jsonl', 'wb') as f:
        f.write(b'\n'.join(line if isinstance(line, bytes) else line.encode() for line in lines) + b'\n')
    (tmp_path / 'ok.txt').write_text(good[2])
    (tmp_path / 'ok2.txt').write_text(good[3])
    big = shakespeare(12_000).encode()
    bad_at = big.index(b'\n', 9000)
    bad_line = big[:bad_at].count(b'\n') + 2
    (tmp_path / 'latin1.txt').write_bytes(big[:bad_at] + b'\nna\xefve\n' + big[bad_at + 1:])
    (tmp_path / 'image.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + b'x' * 100)
    (tmp_path / 'empty.txt').write_bytes(b'')
    summary = prepare_main(tmp_path, '--name', tmp_path / 'ds', '--num_proc', 2)
    reasons = {reason: (entry['count'], entry['first'])
               for reason, entry in summary['skipped']['reasons'].items()}
    jsonl = str(tmp_path / 'records.jsonl')
    assert reasons == {
        'not JSON': (1, [f'{jsonl}:2']),
        'no "text" field': (1, [f'{jsonl}:3']),
        '"text" not a string': (1, [f'{jsonl}:4']),
        'not UTF-8': (2, [f"{tmp_path / 'latin1.txt'}:{bad_line}", f'{jsonl}:7']),
        'binary (NUL bytes)': (1, [str(tmp_path / 'image.png')]),
        'empty': (1, [str(tmp_path / 'empty.txt')]),
    }
    assert summary['skipped']['documents'] == 7
    printed = capsys.readouterr().out
    assert 'skipped 7 documents: ' in printed and f'; not JSON 1 ({jsonl}:2);' in printed
    kept = gpt2_documents(tmp_path / 'ds', 'train') + gpt2_documents(tmp_path / 'ds', 'val')
    assert sorted(kept) == sorted(good[:4])


def test_nothing_usable_is_one_error_line(tmp_path):
    """The command stops with one 'error:' line naming what was skipped when no document is usable, and when
    an input matches no file; it writes no dataset and leaves no .partial."""
    (tmp_path / 'a.jsonl').write_text('{"body": "no text field"}\n')
    (tmp_path / 'b.bin').write_bytes(b'\x00\x01\x02')
    proc = run([sys.executable, PREPARE, str(tmp_path), '--name', str(tmp_path / 'ds')], timeout=60)
    line = one_error(proc)
    assert 'nothing usable in 2 files' in line and 'no "text" field 1' in line and '--text_field' in line
    assert sorted(os.listdir(tmp_path)) == ['a.jsonl', 'b.bin']
    with pytest.raises(ValueError, match='matches no file'):
        prepare_main(tmp_path / '*.txt', '--name', tmp_path / 'ds')
    with pytest.raises(ValueError, match='no such file or folder'):
        prepare_main(tmp_path / 'missing.txt', '--name', tmp_path / 'ds')


def test_an_existing_dataset_needs_force(tmp_path):
    """A folder with a train.bin is not touched without --force (the error names it); with --force the new
    files replace the old, a character vocabulary (meta.json, or an old meta.pkl) goes when the new one is
    BPE, and the folder's other files stay."""
    for i, text in enumerate(make_documents(4)):
        (tmp_path / f'{i}.txt').write_text(text)
    dest = tmp_path / 'ds'
    prepare_main(tmp_path / '*.txt', '--name', dest, '--tokenizer', 'char')
    (dest / 'notes.md').write_text('mine')
    (dest / 'meta.pkl').write_bytes(b'what nanoGPT wrote here before')
    before = snapshot(dest)
    with pytest.raises(ValueError, match='already holds a dataset: add --force'):
        prepare_main(tmp_path / '*.txt', '--name', dest)
    assert snapshot(dest) == before
    prepare_main(tmp_path / '*.txt', '--name', dest, '--force')
    assert sorted(os.listdir(dest)) == ['notes.md', 'prepare.json', 'train.bin', 'val.bin']
    assert read_json(dest)['tokenizer'] == 'gpt2'


def test_a_killed_run_leaves_no_dataset(tmp_path):
    """Everything is written to NAME.partial: a run killed midway leaves no train.bin under NAME, and the
    next run removes the stale .partial before it starts."""
    (tmp_path / 'big').mkdir()
    text = shakespeare(1_000_000)
    for i in range(20):  # 20 MB: more than a second of tokenizing, to be killed in
        (tmp_path / 'big' / f'{i}.txt').write_text(text)
    dest = tmp_path / 'ds'
    proc = subprocess.Popen([os.path.join(BIN, 'python'), PREPARE, str(tmp_path / 'big'), '--name', str(dest),
                             '--num_proc', '1'], cwd=REPO, env=env(), stdout=subprocess.DEVNULL)
    first_unit = tmp_path / 'ds.partial' / 'units' / '0000000.train'
    deadline = time.time() + 30
    while not os.path.exists(first_unit) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, 'prepare finished before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(tmp_path / 'ds.partial') and not os.path.exists(dest)
    (tmp_path / 'a.txt').write_text('First document.\n')
    (tmp_path / 'b.txt').write_text('Second document.\n')
    summary = prepare_main(tmp_path / '*.txt', '--name', dest, '--num_proc', 1)
    assert not os.path.exists(tmp_path / 'ds.partial')
    assert summary['splits']['train']['documents'] == summary['splits']['val']['documents'] == 1


def test_trainer_trains_on_a_prepared_character_folder(tmp_path, monkeypatch):
    """A character-level folder from prepare is a dataset the trainer takes as --dataset=<folder>: the
    trainer (`python train_deepspeed.py`, a world of one) runs an iteration and an eval on it with its
    vocabulary. (The inputs are named relative to tmp_path, so the split, a hash of the names, is the same in
    every run.)"""
    text = shakespeare(30_000)
    pieces = text.split('\n\n')
    for i in range(20):
        (tmp_path / f'{i:02d}.txt').write_text('\n\n'.join(pieces[i::20]))
    dest = tmp_path / 'chars'
    monkeypatch.chdir(tmp_path)
    summary = prepare_main('*.txt', '--name', dest, '--tokenizer', 'char', '--val_fraction', 0.2)
    block_size = int(next(a for a in TINY if a.startswith('--block_size='))[13:])
    assert min(summary['splits'][s]['tokens'] for s in ('train', 'val')) > block_size + 1
    out = tmp_path / 'out'
    proc = ok(run([sys.executable, 'train_deepspeed.py', *TINY, f'--dataset={dest}', f'--out_dir={out}',
                   '--max_iters=1', '--eval_interval=1']))
    evals = [record for record in metrics(out) if 'val_loss' in record]
    assert evals and np.isfinite(evals[-1]['val_loss']), proc.stdout[-2000:]
    with open(out / 'run.json') as f:  # the model the trainer built: the folder's vocabulary, separator too
        assert json.load(f)['model_args']['vocab_size'] == summary['vocab_size']
