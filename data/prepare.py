"""
Any text corpus to a dataset for train_deepspeed.py, streamed and in parallel, split into train and val by
document.
    python data/prepare.py INPUT... --name NAME [--tokenizer gpt2|char] [--val_fraction 0.1] [--seed 0]
                           [--num_proc N] [--text_field text] [--force]

INPUT: files, folders (searched recursively; names starting with '.' left out) and globs; a file named twice
is read once. A *.jsonl file holds one document a line, the string in its --text_field; any other file is
one plain-text document. A .gz ending means gzip (*.jsonl.gz, *.txt.gz). Text must be UTF-8.

NAME: data/NAME, or a folder path. It gets train.bin and val.bin (uint16 token ids, each document followed by
an end-of-text token: GPT-2's 50256 for --tokenizer gpt2; for --tokenizer char, the id after the corpus's
characters), meta.json for --tokenizer char (vocab_size, itos, stoi as data/shakespeare_char has them, and
the separator's id), and prepare.json: the sources, documents and tokens per split, the settings, what was
skipped. Everything is written to NAME.partial first and moved into place when complete; an existing dataset
is replaced only with --force.

A document goes to val when a hash of (seed, its file as named, where it starts in the file) falls below
--val_fraction, so the split is the same for any --num_proc (name the inputs the same way to get it again)
and no document is cut between train and val. When that leaves a split empty, the document nearest to the
line moves over: two documents or more always give both splits one. A corpus of one document (a single text
file) has its last --val_fraction of tokens as val, nanoGPT's split of its one Shakespeare text. Lines and
files that cannot be used (bad JSON, no text field, not UTF-8, binary, empty or whitespace only) are skipped
and summed up, on the screen and in prepare.json; where nothing is left, the command stops with one error
line.

Memory stays bounded whatever the corpus: the work is cut into units of about UNIT_BYTES of input (from the
file list alone, so the output does not depend on --num_proc either), each tokenized by one of --num_proc
processes into files of its own that are joined in order at the end; text is read CHUNK_BYTES at a time and
JSON Lines a line at a time. A big text file is cut at line ends where GPT-2's BPE gives the same tokens as
for the whole text (EXACT_CUT). A gzip file is one unit however big (it cannot be cut), so one process
tokenizes it: give a big corpus as several .gz files.
"""
import argparse
import difflib
import functools
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

# its helpers beside it, also when it is loaded by its path (the Shakespeare scripts, tests): the project's
# one import-path setting (the package, nanogpt_ds, is installed by setup.sh or pip install -e .)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus_reading import SPLITS, Report, find_sources, plan_units, read_unit, span_bytes  # noqa: E402
from nanogpt_ds.data_sources import folder, write_meta  # noqa: E402
from dataset_joining import Skipped, balance, concatenate, keep_units, split_tail, unit_file  # noqa: E402
from nanogpt_ds.tokenizer import EOT_TEXT, EOT_TOKEN, gpt2_encoding  # noqa: E402

# what a dataset folder gets from here (an older run's meta.pkl, which nanoGPT's format was, is removed)
OUTPUTS = ('train.bin', 'val.bin', 'meta.json', 'meta.pkl', 'prepare.json')
FLUSH_TOKENS = 1 << 20  # tokens a unit buffers before writing them out


class Arguments(argparse.ArgumentParser):
    """argparse with every command's way of failing: one error line, the nearest option for a typo."""
    hint = 'python data/prepare.py INPUT... --name NAME (--help says more)'  # the command, as it is typed

    def parse_args(self, args=None, namespace=None):
        self.given = sys.argv[1:] if args is None else list(args)  # for error() to look at
        return super().parse_args(args, namespace)

    def error(self, message):  # one 'error:' line like every command's, not argparse's usage and its own line
        options = [option for action in self._actions for option in action.option_strings]
        for arg in self.given:
            name = arg.split('=')[0]
            unknown = arg.startswith('--') and not any(option.startswith(name) for option in options)
            nearest = difflib.get_close_matches(name, options, n=1) if unknown else []
            if nearest:  # argparse would complain of what the typo left out: say what was meant instead
                raise ValueError(f'unknown option {name}: did you mean {nearest[0]}? (--help lists them all)')
        raise ValueError(f'{message}: {self.hint}')


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and each option's default."""


def parse_args(argv):
    p = Arguments(description=__doc__, formatter_class=Formatter)
    p.add_argument('inputs', nargs='+', metavar='INPUT', help='files, folders or globs')
    p.add_argument('--name', required=True, help='the dataset: data/NAME, or a folder path')
    p.add_argument('--tokenizer', choices=('gpt2', 'char'), default='gpt2')
    p.add_argument('--val_fraction', type=float, default=0.1, help='share of the documents for val.bin')
    p.add_argument('--seed', type=int, default=0, help='which documents go to val')
    p.add_argument('--num_proc', type=int, default=os.cpu_count() or 1, help='tokenizing processes')
    p.add_argument('--text_field', default='text', help="the field of a JSON Lines record with the text")
    p.add_argument('--force', action='store_true', help='replace an existing dataset')
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f'--val_fraction {args.val_fraction} is not a share: give one between 0 and 1, '
                         'like 0.1')
    if args.num_proc < 1:
        raise ValueError(f'--num_proc {args.num_proc}: give 1 or more processes')
    examples = {'name': 'the dataset, like --name mydata', 'text_field': 'the field, like --text_field text'}
    for option, example in examples.items():
        if not getattr(args, option).strip():
            raise ValueError(f'--{option} is empty: give {example}')
    return args


@dataclass
class Work:
    """What every worker needs to know: set once per process (init_worker), not sent with each unit."""
    sources: list
    units: list
    folder: str  # where units write their tokens
    seed: int
    val_fraction: float
    text_field: str
    tokenizer: str
    count_chars: bool = False  # the first pass of --tokenizer char: the characters, no tokens
    char_ids: np.ndarray = None  # code point -> id, for --tokenizer char
    end_of_text: int = EOT_TOKEN


WORK = None


def init_worker(work):
    global WORK
    WORK = work


@functools.cache
def bpe():
    return gpt2_encoding()


def encode(text):
    if WORK.tokenizer == 'gpt2':
        return np.asarray(bpe().encode_ordinary(text), dtype=np.uint16)
    code_points = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
    return WORK.char_ids[code_points]


class Tokens:
    """A unit's token ids, per split, into its two files; a document can be taken back until it ends."""

    def __init__(self, report):
        self.report = report
        self.files = {s: open(unit_file(WORK.folder, report.index, s), 'wb') for s in SPLITS}
        self.buffers = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.written = dict.fromkeys(SPLITS, 0)
        self.in_document = False

    def count(self, split):
        return self.written[split] + self.buffered[split]

    def begin(self, split, doc_hash):
        self.split, self.hash, self.start = split, doc_hash, self.count(split)
        self.in_document = True

    def write(self, text):
        self.write_ids(encode(text))

    def write_ids(self, ids):
        self.buffers[self.split].append(ids)
        self.buffered[self.split] += len(ids)
        if self.buffered[self.split] >= FLUSH_TOKENS:
            self.flush(self.split)

    def end(self, end_of_document=True):
        self.in_document = False
        if not end_of_document:  # a document cut into units goes on in the next unit
            return
        self.write_ids(np.array([WORK.end_of_text], dtype=np.uint16))
        self.report.documents[self.split] += 1
        place = (self.hash, self.start, self.count(self.split))
        if self.split == 'train':
            lowest = self.report.lowest_train
            if lowest is None or self.hash < lowest[0]:
                self.report.lowest_train = place
        else:
            highest = self.report.highest_val
            if highest is None or self.hash > highest[0]:
                self.report.highest_val = place

    def drop(self):
        """Takes back the document begun, if one is."""
        if not self.in_document:
            return
        self.in_document = False
        split = self.split
        self.flush(split)
        self.files[split].truncate(2 * self.start)
        self.files[split].seek(2 * self.start)
        self.written[split] = self.start

    def flush(self, split):
        if self.buffers[split]:
            try:
                np.concatenate(self.buffers[split]).tofile(self.files[split])
            except OSError as e:  # not the input's fault: stop (ValueError), don't skip the document
                path = self.files[split].name
                raise ValueError(f'cannot write {path}: {e.strerror}: free some disk space') from e
        self.written[split] += self.buffered[split]
        self.buffers[split], self.buffered[split] = [], 0

    def close(self):
        for split in SPLITS:
            self.flush(split)
            self.files[split].close()
            self.report.tokens[split] = self.written[split]


class Characters:
    """The first pass of --tokenizer char: the characters of the documents a unit keeps."""

    def __init__(self, report):
        self.report, self.document = report, set()

    def begin(self, split, doc_hash):
        self.document = set()

    def write(self, text):
        self.document.update(text)

    def end(self, end_of_document=True):
        self.report.chars |= self.document

    def drop(self):
        self.document = set()

    def close(self):
        pass


def run_unit(index):
    """Reads and tokenizes one unit (in a worker process); its Report."""
    report = Report(index)
    sink = Characters(report) if WORK.count_chars else Tokens(report)
    read_unit(WORK, report, sink)
    sink.close()
    return report


def run_units(work, num_proc, label):
    """Every unit's Report, in unit order, with a progress bar (by input bytes) when stderr is a terminal."""
    spans = [span for unit in work.units for span in unit.spans]
    total = sum(span_bytes(work.sources[i], start, end) for i, start, end in spans)
    bar = tqdm(total=total, unit='B', unit_scale=True, desc=label, file=sys.stderr, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    processes = min(num_proc, len(work.units))
    if processes <= 1:
        init_worker(work)
        reports = collect(map(run_unit, range(len(work.units))), bar)
    else:
        if work.tokenizer == 'gpt2' and not work.count_chars:
            bpe()  # built once, here: forked workers inherit it
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context('fork' if 'fork' in methods else None)
        with context.Pool(processes, initializer=init_worker, initargs=(work,)) as pool:
            reports = collect(pool.imap_unordered(run_unit, range(len(work.units))), bar)
    bar.close()
    return sorted(reports, key=lambda report: report.index)


def collect(reports, bar):
    """The reports as they come, each moving the bar on by its bytes and updating the token rate."""
    started, tokens, collected = time.time(), 0, []
    for report in reports:
        collected.append(report)
        tokens += sum(report.tokens.values())
        bar.update(report.input_bytes)
        if tokens:
            bar.set_postfix_str(f'{tokens / max(time.time() - started, 1e-9) / 1e6:.2f}M tokens/s')
    return collected


def install(partial, dest):
    """Moves the finished dataset from partial into place: a rename when dest is new, else file by file
    (each a rename, so a reader sees a file old or new, never half-written; the folder's other files stay)."""
    if not os.path.exists(dest):
        os.rename(partial, dest)
        return
    for name in OUTPUTS:
        target = os.path.join(dest, name)
        if os.path.exists(os.path.join(partial, name)):
            os.replace(os.path.join(partial, name), target)
        elif os.path.exists(target):  # e.g. a character vocabulary, wrong for GPT-2 tokens
            os.remove(target)
    shutil.rmtree(partial)


def character_vocabulary(work, num_proc):
    """The first pass of --tokenizer char: the vocabulary's dict, from every character of the documents kept.
    Sets work up to tokenize with it."""
    work.count_chars = True
    reports = run_units(work, num_proc, 'characters')
    chars = set()
    for index in keep_units(work, reports, Skipped()):
        chars |= reports[index].chars
    chars = sorted(chars)
    if len(chars) + 1 > 2 ** 16:
        raise ValueError(f'{len(chars):,} different characters do not fit uint16 token ids: use '
                         '--tokenizer gpt2')
    separator = len(chars)  # the end of a document: an id of its own, after the characters
    # code point -> id, for every code point: a document this pass skipped is tokenized again before it is
    # skipped again (whitespace only, not UTF-8 further on), and its characters may not be in the vocabulary
    char_ids = np.zeros(sys.maxunicode + 1, dtype=np.uint16)
    char_ids[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint16)
    work.count_chars, work.char_ids, work.end_of_text = False, char_ids, separator
    itos = {**dict(enumerate(chars)), separator: EOT_TEXT}
    stoi = {ch: i for i, ch in itos.items()}
    return {'vocab_size': len(chars) + 1, 'itos': itos, 'stoi': stoi, 'separator': separator}


def main(argv=None):
    """Prepares a dataset; returns what prepare.json says. Bad input: ValueError, the fix in its message."""
    started = time.time()
    args = parse_args(argv)
    dest = folder(args.name).rstrip(os.sep)
    partial = dest + '.partial'
    if os.path.exists(os.path.join(dest, 'train.bin')) and not args.force:
        raise ValueError(f'{dest} already holds a dataset: add --force to replace it, or give another --name')
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f'{dest} is a file: --name must name a folder')
    outputs = {os.path.realpath(os.path.join(dest, name)) for name in OUTPUTS}
    partial_real = os.path.realpath(partial)

    def is_output(path):  # this dataset's own files, old or being written, are never inputs
        return path in outputs or path.startswith(partial_real + os.sep)

    sources = find_sources(args.inputs, is_output)
    input_bytes = sum(s.size for s in sources)
    files = counted(len(sources), 'file')
    print(f'{args.name}: {files}, {input_bytes / 1e6:,.1f} MB, tokenizer {args.tokenizer}')
    if os.path.exists(partial):
        shutil.rmtree(partial)  # what a killed run left
    try:
        summary = prepare(args, sources, partial, started)
    except ValueError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    install(partial, dest)
    print(f'wrote {dest}')
    return summary


def prepare(args, sources, partial, started):
    """Tokenizes the sources into partial: train.bin, val.bin, meta.json (char), prepare.json."""
    units_folder = os.path.join(partial, 'units')
    os.makedirs(units_folder)
    work = Work(sources, plan_units(sources), units_folder, args.seed, args.val_fraction, args.text_field,
                args.tokenizer)
    meta = character_vocabulary(work, args.num_proc) if args.tokenizer == 'char' else None
    tokenizing_started = time.time()
    reports = run_units(work, args.num_proc, 'tokenizing')
    tokenizing_s = max(time.time() - tokenizing_started, 1e-9)
    skipped = Skipped()
    kept = keep_units(work, reports, skipped)
    documents = {s: sum(reports[i].documents[s] for i in kept) for s in SPLITS}
    if skipped.total():
        print(skipped.line())
    if sum(documents.values()) == 0:
        reasons = ', '.join(f'{reason} {count}' for reason, count in skipped.counts.items())
        raise ValueError(f'nothing usable in {len(sources):,} files (skipped: {reasons}): give UTF-8 text, '
                         f'or JSON Lines with a "{args.text_field}" string (--text_field)')
    one_document = sum(documents.values()) == 1
    moved_from, moves, moved = None, {}, None
    if not one_document:
        moved_from, moves = balance(work, reports, kept)
    if moved_from:
        moved_to = 'val' if moved_from == 'train' else 'train'
        documents[moved_from] -= 1
        documents[moved_to] += 1
        moved = f'1 document from {moved_from} to {moved_to}, where none hashed'
        print(f'moved {moved}')
    tokens = concatenate(work, reports, kept, moved_from, moves, partial)
    if one_document:  # nothing to split by: its tail is val, as nanoGPT splits its one Shakespeare text
        tokens = split_tail(partial, tokens, args.val_fraction)
        documents = dict.fromkeys(SPLITS, 1)
        moved = f'one document: its last {tokens["val"]:,} tokens are val.bin'
        print(moved)
    shutil.rmtree(units_folder)
    if meta:
        write_meta(partial, meta)  # JSON: a dataset read by the trainer runs no code (data_sources.read_meta)
    summary = {
        'inputs': args.inputs,
        'sources': [s.path for s in sources],
        'input_bytes': sum(s.size for s in sources),
        'tokenizer': args.tokenizer,
        'vocab_size': meta['vocab_size'] if meta else EOT_TOKEN + 1,
        'end_of_text': work.end_of_text,
        'text_field': args.text_field,
        'val_fraction': args.val_fraction,
        'seed': args.seed,
        'splits': {s: {'documents': documents[s], 'tokens': tokens[s]} for s in SPLITS},
        'moved': moved,
        'skipped': skipped.as_json(),
    }
    with open(os.path.join(partial, 'prepare.json'), 'w') as f:
        json.dump(summary, f, indent=2)
        f.write('\n')
    for split in SPLITS:
        print(f"{split}.bin: {tokens[split]:,} tokens, {counted(documents[split], 'document')}")
    megabytes, total_tokens = summary['input_bytes'] / 1e6, sum(tokens.values())
    processes = counted(min(args.num_proc, len(work.units)), 'process')
    print(f'{time.time() - started:.1f} s; tokenizing {megabytes / tokenizing_s:.1f} MB/s, '
          f'{total_tokens / tokenizing_s / 1e6:.2f}M tokens/s in {processes}')
    return summary


def counted(n, noun):
    """'1 document', '2 documents', '1 process', '2 processes'."""
    if n == 1:
        return f'1 {noun}'
    plural = noun + 'es' if noun.endswith('s') else noun + 's'
    return f'{n:,} {plural}'


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:
        from nanogpt_ds.settings import die
        die(str(e))
