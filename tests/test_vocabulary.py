"""The character vocabulary is data, never code: data_sources writes it as meta.json and reads that back as
the dict nanoGPT's meta.pkl holds; an old meta.pkl still loads, as plain data only. A pickle that would
import or call anything, a file that is no pickle, a truncated one or a dict of the wrong shape is one
'error:' line that names the file, from the trainer and from sample.py, and nothing in it runs (those four
commands, each loading torch to say its line, run two at a time: the received fixture)."""
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import run, selected

from model import GPT, GPTConfig
from nanogpt_ds import data_sources
from nanogpt_ds.tokenizer import EOT_TEXT, load_codec

TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n'


def nanogpt_meta(text=TEXT):
    """The dict nanoGPT's shakespeare_char/prepare.py pickles: int ids to characters and back."""
    chars = sorted(set(text))
    itos = dict(enumerate(chars))
    return {'vocab_size': len(chars), 'itos': itos, 'stoi': {c: i for i, c in itos.items()}}


def our_old_meta(text=TEXT):
    """The dict data/prepare.py --tokenizer char pickled before meta.json: nanoGPT's and a separator."""
    meta = nanogpt_meta(text)
    separator = meta['vocab_size']
    meta['itos'][separator], meta['stoi'][EOT_TEXT] = EOT_TEXT, separator
    return dict(meta, vocab_size=separator + 1, separator=separator)


def pickled(folder, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path = os.path.join(folder, data_sources.OLD_VOCABULARY)
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class RunsACommand:
    """Unpickled by pickle.load, this calls os.system: what a meta.pkl from a stranger could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class ExecsCode(RunsACommand):
    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").close()',)


@pytest.mark.parametrize('meta', [our_old_meta(), nanogpt_meta(), {'vocab_size': 85}])
def test_meta_json_gives_back_the_pickled_dict(tmp_path, meta):
    old = data_sources.read_meta(pickled(tmp_path, meta))
    path = data_sources.write_meta(tmp_path, old)
    assert path == str(tmp_path / 'meta.json') and data_sources.vocabulary_file(tmp_path) == path
    again = data_sources.read_meta(path)
    assert again == old == meta
    assert all(type(i) is int for i in again.get('itos', {}))


def test_an_old_meta_pkl_gives_the_same_codec(tmp_path):
    """nanoGPT's own meta.pkl, from pickle.dump of a plain dict, encodes and decodes as its meta.json does."""
    (tmp_path / 'old').mkdir()
    (tmp_path / 'new').mkdir()
    old_path = pickled(tmp_path / 'old', nanogpt_meta())
    assert data_sources.vocabulary_file(tmp_path / 'old') == old_path
    new_path = data_sources.write_meta(tmp_path / 'new', nanogpt_meta())
    (old_encode, old_decode), (new_encode, new_decode) = load_codec(old_path), load_codec(new_path)
    assert old_encode(TEXT) == new_encode(TEXT) == [nanogpt_meta()['stoi'][c] for c in TEXT]
    assert old_decode(old_encode(TEXT)) == new_decode(new_encode(TEXT)) == TEXT


@pytest.mark.parametrize('payload', [RunsACommand, ExecsCode])
@pytest.mark.parametrize('protocol', [0, pickle.DEFAULT_PROTOCOL])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, payload, protocol):
    marker = tmp_path / 'ran'
    path = pickled(tmp_path, {'vocab_size': 3, 'itos': payload(marker)}, protocol)
    with pytest.raises(ValueError) as refused:
        data_sources.read_meta(path)
    assert str(refused.value).startswith(f'{path} is not a usable vocabulary')
    assert 'only plain data is read' in str(refused.value) and not marker.exists()


BROKEN = {
    'not_a_pickle': ('meta.pkl', b'a text file, not a pickle\n', 'reading it as a pickle'),
    'truncated': ('meta.pkl', pickle.dumps(our_old_meta())[:-20], 'reading it as a pickle'),
    'a_list': ('meta.pkl', pickle.dumps([1, 2]), 'holds a list, not a dict'),
    'no_size': ('meta.pkl', pickle.dumps({'itos': {0: 'a'}}), 'vocab_size is None'),
    'stoi_off_by_one': ('meta.pkl', pickle.dumps(dict(nanogpt_meta(), stoi={'a': 1})), 'not the inverse'),
    'ids_beyond_the_size': ('meta.pkl', pickle.dumps(dict(nanogpt_meta(), vocab_size=2)), 'itos is not'),
    'not_json': ('meta.json', b'{"vocab_size": 3,', 'reading it as JSON'),
    'itos_with_string_keys': ('meta.json', b'{"vocab_size": 1, "itos": {"0": "a"}, "stoi": {"a": 0}}',
                              'itos is not'),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_a_file_that_is_no_vocabulary_names_itself_and_the_fix(tmp_path, case):
    name, content, phrase = BROKEN[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as refused:
        data_sources.read_meta(data_sources.vocabulary_file(tmp_path))
    line = str(refused.value)
    assert line.startswith(f'{tmp_path / name} is not a usable vocabulary') and phrase in line, line
    assert 'replace it with the meta.json of the dataset' in line  # no train.bin: an out_dir's or an export's


def dataset_folder(folder):
    """A dataset folder as a stranger might send one: Shakespeare's ids, and a vocabulary file added later."""
    char = data_sources.folder('shakespeare_char')
    folder.mkdir()
    for split in ('train', 'val'):
        shutil.copy(os.path.join(char, f'{split}.bin'), folder)
    return folder


def export_folder(folder):
    """An export folder as a stranger might send one: a tiny model's ckpt.pt (read weights_only)."""
    folder.mkdir()
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=85)
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0},
               folder / 'ckpt.pt')
    return folder


COMMANDS = {  # the cheapest reader of each kind of folder: the trainer's data check, sample.py's codec
    'trainer': (dataset_folder, lambda folder, tmp: ['train_deepspeed.py', f'--dataset={folder}',
                                                     f"--out_dir={tmp / 'out'}", '--dtype=float32']),
    'sample': (export_folder, lambda folder, tmp: ['sample.py', f'--init_from={folder}', '--device=cpu',
                                                   '--num_samples=1', '--max_new_tokens=2']),
}


def receive(command, bad, tmp):
    """The command's folder with a bad vocabulary in it, in tmp; (the vocabulary's path, the marker that its
    code would write, the command line)."""
    make_folder, arguments = COMMANDS[command]
    folder, marker = make_folder(tmp / 'received'), tmp / 'ran'
    if bad == 'runs_code':
        path = pickled(folder, {'vocab_size': 85, 'itos': RunsACommand(marker)})
    else:
        path = folder / 'meta.pkl'
        path.write_bytes(np.arange(64, dtype=np.uint16).tobytes())
    return path, marker, [sys.executable, *arguments(folder, tmp)]


@pytest.fixture(scope='module')
def received(two_at_a_time, tmp_path_factory, request):
    """(command, bad) -> (tmp, vocabulary path, marker, Future of the CompletedProcess) for each case below
    that this session runs, every command started at once."""
    started = {}
    for _, (command, bad) in selected(request, ['test_commands_refuse_it_in_one_line'], 'command_and_bad'):
        tmp = tmp_path_factory.mktemp(f'{command}_{bad}')
        path, marker, command_line = receive(command, bad, tmp)
        future = two_at_a_time.submit(run, command_line, timeout=120, merge_stderr=False)
        started[command, bad] = tmp, path, marker, future
    return started


@pytest.mark.parametrize('command_and_bad', [(command, bad) for command in COMMANDS
                                             for bad in ('runs_code', 'not_a_pickle')],
                         ids=lambda case: '-'.join(case))
def test_commands_refuse_it_in_one_line(command_and_bad, received):
    tmp, path, marker, future = received[command_and_bad]
    proc = future.result()
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert proc.returncode != 0 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f'error: {path} is not a usable vocabulary'), errors[0]
    assert not marker.exists() and not (tmp / 'out').exists()
