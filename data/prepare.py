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
characters), meta.pkl for --tokenizer char (vocab_size, itos, stoi as data/shakespeare_char has them, and the
separator's id), and prepare.json: the sources, documents and tokens per split, the settings, what was
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
import codecs
import functools
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data_sources import folder  # noqa: E402
from tokenizer import EOT_TEXT, EOT_TOKEN, gpt2_encoding  # noqa: E402

SPLITS = ('train', 'val')
OUTPUTS = ('train.bin', 'val.bin', 'meta.pkl', 'prepare.json')  # what a dataset folder gets from here
# The work is cut into units of about this much input, whatever --num_proc is, so the output is too: small
# files are packed together, a bigger one is cut at line ends (a gzip file, which cannot be cut, is one unit).
UNIT_BYTES = 4 << 20
CHUNK_BYTES = 1 << 20  # read and tokenized at a time: memory stays bounded whatever the size of a file
MAX_BUFFER_BYTES = 4 << 20  # text carried over while looking for a cut that BPE cannot tell from no cut
HEAD_BYTES = 8192  # a NUL byte in this many first bytes makes a file binary
FLUSH_TOKENS = 1 << 20  # tokens a unit buffers before writing them out
MAX_PLACES = 3  # places listed per reason a document was skipped
# Where a text can be cut and tokenized in two pieces with the same GPT-2 tokens as in one: after a line end
# that has a printable ASCII character on each side. GPT-2's pre-tokenizer always splits there (a piece never
# runs from a line end into a non-space), and the whitespace piece is the '\n' alone either way. A cut
# elsewhere (next to more whitespace, as before an indented line) can merge '\n' with the spaces after it in
# one text and not in two.
EXACT_CUT = re.compile(rb'[\x21-\x7e]\n(?=[\x21-\x7e])')


class Arguments(argparse.ArgumentParser):
    def error(self, message):  # one 'error:' line like every command's, not argparse's usage and its own line
        raise ValueError(f'{message}: python data/prepare.py INPUT... --name NAME (--help says more)')


def parse_args(argv):
    p = Arguments(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return args


@dataclass
class Source:
    path: str  # as named (a folder's files under the folder as named): also what the split hashes
    size: int
    jsonl: bool
    gz: bool


@dataclass
class Unit:
    spans: list  # (source index, start, end) byte ranges; end None: to the end (gzip)
    part_of: int = None  # a plain-text file cut into several units (one document): its source index


def find_sources(inputs, leave_out):
    """The files the inputs name, in the order named (folders and globs sorted), each once; none for which
    leave_out(real path) is true."""
    found, seen = [], set()
    for name in inputs:
        has_pattern = any(c in name for c in '*?[') and not os.path.exists(name)
        matches = sorted(glob.glob(name, recursive=True)) if has_pattern else [name]
        if has_pattern and not matches:
            raise ValueError(f'{name} matches no file: check the pattern (and quote it, for the shell)')
        if not has_pattern and not os.path.exists(name):
            raise ValueError(f'{name}: no such file or folder')
        files = []
        for match in matches:
            files.extend(walk(match) if os.path.isdir(match) else [match])
        files = [f for f in files if not leave_out(os.path.realpath(f))]
        if not files:
            raise ValueError(f'{name} holds no files to read')
        for path in files:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            lower = path.lower()
            found.append(Source(os.path.normpath(path), os.path.getsize(path),
                                jsonl=lower.endswith(('.jsonl', '.jsonl.gz')), gz=lower.endswith('.gz')))
    return found


def walk(top):
    files = []
    for where, dirs, names in os.walk(top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        files.extend(os.path.join(where, n) for n in sorted(names) if not n.startswith('.'))
    return files


def plan_units(sources):
    """Units of about UNIT_BYTES from the file list alone: small files packed in order, a big file cut into
    units of its own at line ends (a gzip file, which cannot be cut, is one)."""
    units, pack, pack_bytes = [], [], 0
    for index, source in enumerate(sources):
        if source.size < UNIT_BYTES:
            pack.append((index, 0, None if source.gz else source.size))  # gzip: its size is not the text's
            pack_bytes += source.size
            if pack_bytes >= UNIT_BYTES:
                units.append(Unit(pack))
                pack, pack_bytes = [], 0
            continue
        if pack:
            units.append(Unit(pack))
            pack, pack_bytes = [], 0
        if source.gz:
            units.append(Unit([(index, 0, None)]))
            continue
        cuts = cut_points(source)
        ends = cuts[1:] + [source.size]
        cut_into_parts = len(cuts) > 1 and not source.jsonl  # one document in several units
        for start, end in zip(cuts, ends):
            units.append(Unit([(index, start, end)], part_of=index if cut_into_parts else None))
    if pack:
        units.append(Unit(pack))
    return units


def cut_points(source):
    """Starts of a big uncompressed file's units: 0, then every UNIT_BYTES the first line end after, found in
    a window of CHUNK_BYTES (for text, one that BPE does not see, EXACT_CUT, where the window has one)."""
    cuts = [0]
    with open(source.path, 'rb') as f:
        for target in range(UNIT_BYTES, source.size, UNIT_BYTES):
            if target <= cuts[-1]:
                continue
            f.seek(target - 1)
            window = f.read(CHUNK_BYTES + 1)
            exact = None if source.jsonl else EXACT_CUT.search(window)
            newline = window.find(b'\n', 1)
            if exact:
                cut = target - 1 + exact.end()
            elif newline >= 0:
                cut = target + newline
            else:
                continue  # no line end near: this unit goes on to the next target
            if cut < source.size:
                cuts.append(cut)
    return cuts


def split_of(seed, path, offset, val_fraction):
    """('train' or 'val', the hash): a document's split from (seed, its file, where it starts) alone."""
    digest = hashlib.blake2b(f'{seed}\0{path}\0{offset}'.encode('utf-8', 'surrogateescape'), digest_size=8)
    value = int.from_bytes(digest.digest(), 'big')
    return ('val' if value < val_fraction * 2 ** 64 else 'train'), value


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


@dataclass
class Report:
    """What a unit tells the parent: counts, the skipped, and the document each split can best give away."""
    index: int
    input_bytes: int = 0
    newlines: int = 0  # in a unit of one span: to number the lines of the units after it in the same file
    has_text: bool = False  # anything but whitespace (a part of a document cut into units)
    skipped: Counter = field(default_factory=Counter)
    places: list = field(default_factory=list)  # (reason, source index, line in the span or None)
    documents: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    lowest_train: tuple = None  # (hash, first token, end token) of the train document nearest to val
    highest_val: tuple = None  # and the other way round
    chars: set = field(default_factory=set)

    def skip(self, reason, source_index, line=None):
        self.skipped[reason] += 1
        if self.skipped[reason] <= MAX_PLACES:
            self.places.append((reason, source_index, line))


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


def unit_file(folder, index, split):
    return os.path.join(folder, f'{index:07d}.{split}')


def run_unit(index):
    """Reads and tokenizes one unit (in a worker process); its Report."""
    report = Report(index)
    sink = Characters(report) if WORK.count_chars else Tokens(report)
    for source_index, start, end in WORK.units[index].spans:
        source = WORK.sources[source_index]
        report.input_bytes += span_bytes(source, start, end)
        try:
            if source.size == 0:
                report.skip('empty', source_index)
            elif is_binary(source):
                report.skip('binary (NUL bytes)', source_index)
            elif source.jsonl:
                read_jsonl(source_index, start, end, sink, report)
            else:
                read_text(source_index, start, end, sink, report)
        except (OSError, EOFError, zlib.error) as e:  # unreadable, or a broken gzip stream
            sink.drop()
            report.skip(f'unreadable ({type(e).__name__})', source_index)
    sink.close()
    return report


def span_bytes(source, start, end):
    return (source.size if end is None else end) - start


def open_input(source):
    return gzip.open(source.path, 'rb') if source.gz else open(source.path, 'rb')


def is_binary(source):
    with open_input(source) as f:
        return b'\0' in f.read(HEAD_BYTES)


def has_text(text):
    return bool(text) and not text.isspace()


def read_jsonl(source_index, start, end, sink, report):
    """One document a line: the string in the line's text field. A line that fails is skipped alone; a blank
    line is no document."""
    source = WORK.sources[source_index]
    with open_input(source) as f:
        f.seek(start)
        offset, line, used = start, 0, 0  # used: lines that were documents or were skipped
        for raw in f:  # a line at a time: memory holds one document
            line += 1
            report.newlines += 1
            line_offset = offset
            offset += len(raw)
            if raw.strip():
                used += 1
                text, unusable = jsonl_text(raw, WORK.text_field)
                if unusable:
                    report.skip(unusable, source_index, line)
                else:
                    split, doc_hash = split_of(WORK.seed, source.path, line_offset, WORK.val_fraction)
                    sink.begin(split, doc_hash)
                    sink.write(text)
                    sink.end()
            if end is not None and offset >= end:
                break
    whole_file = start == 0 and end in (None, source.size)
    if whole_file and used == 0:  # blank lines only
        report.skip('empty', source_index)


def jsonl_text(raw, text_field):
    """(the document of a JSON Lines line, None), or (None, why it cannot be used)."""
    try:
        record = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError:
        return None, 'not UTF-8'
    except ValueError:
        return None, 'not JSON'
    if not isinstance(record, dict) or text_field not in record:
        return None, f'no "{text_field}" field'
    text = record[text_field]
    if not isinstance(text, str):
        return None, f'"{text_field}" not a string'
    if not has_text(text):
        return None, 'empty'
    return text, None


def read_text(source_index, start, end, sink, report):
    """A plain-text document (or a unit's part of one), read and tokenized about CHUNK_BYTES at a time. A
    chunk ends at an EXACT_CUT line end, so GPT-2's tokens are those of the whole text; only a text without
    one for MAX_BUFFER_BYTES is cut at another line end (or anywhere, without a line end), where its tokens
    may differ from those of one pass over the whole text. The document is dropped if any of it is not
    UTF-8, or all of it is whitespace."""
    source = WORK.sources[source_index]
    is_part = WORK.units[report.index].part_of is not None
    split, doc_hash = split_of(WORK.seed, source.path, 0, WORK.val_fraction)
    decoder = codecs.getincrementaldecoder('utf-8')()
    sink.begin(split, doc_hash)
    lines, any_text = 0, False
    with open_input(source) as f:
        f.seek(start)
        remaining = span_bytes(source, start, end) if end is not None else None
        buffer, at_end = b'', False
        while not at_end:
            block = f.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
            if remaining is not None:
                remaining -= len(block)
            at_end = not block
            buffer += block
            piece, buffer = cut_piece(buffer, at_end)
            if piece is None:
                continue
            try:
                text = decoder.decode(piece, final=at_end)
            except UnicodeDecodeError as e:
                sink.drop()
                report.skip('not UTF-8', source_index, lines + piece.count(b'\n', 0, max(0, e.start)) + 1)
                return
            lines += piece.count(b'\n')
            any_text = any_text or has_text(text)
            sink.write(text)
    report.newlines += lines
    if is_part:  # the parent drops the document if no part of it has text
        report.has_text = report.has_text or any_text
    elif not any_text:
        sink.drop()
        report.skip('empty', source_index)
        return
    sink.end(end_of_document=end is None or end == source.size)


def cut_piece(buffer, at_end):
    """(the start of buffer to tokenize now, or None, and the rest, kept for the next block)."""
    if at_end:
        return buffer, b''
    exact = EXACT_CUT.search(buffer, len(buffer) // 2)
    if exact:
        return buffer[:exact.end()], buffer[exact.end():]
    if len(buffer) < MAX_BUFFER_BYTES:
        return None, buffer  # read on: an exact cut is usually near
    last_newline = buffer.rfind(b'\n')
    cut = len(buffer)  # no line end at all: anywhere (the decoder keeps a character cut in two whole)
    if last_newline >= 0:
        cut = last_newline + 1
    return buffer[:cut], buffer[cut:]


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


class Skipped:
    """The documents left out: a count per reason and the first few places of each."""

    def __init__(self):
        self.counts, self.places = Counter(), {}

    def add(self, reason, count, places):
        self.counts[reason] += count
        kept = self.places.setdefault(reason, [])
        kept.extend(places[:MAX_PLACES - len(kept)])

    def total(self):
        return sum(self.counts.values())

    def line(self):
        reasons = []
        for reason, count in self.counts.items():
            shown = ', '.join(self.places[reason])
            if count > len(self.places[reason]):
                shown += ', ...'
            reasons.append(f'{reason} {count} ({shown})')
        return f"skipped {self.total():,} documents: {'; '.join(reasons)}"

    def as_json(self):
        reasons = {reason: {'count': count, 'first': self.places[reason]}
                   for reason, count in self.counts.items()}
        return {'documents': self.total(), 'reasons': reasons}


def place_of(source, line, lines_before=0):
    """'file:line' (line counted in a unit that starts after lines_before lines of the file), or the file
    alone where the whole file was skipped."""
    if line is None:
        return source.path
    return f'{source.path}:{lines_before + line}'


def keep_units(work, reports, skipped):
    """The units that make the dataset: a text file cut into several units is kept whole or not at all (when
    a part failed, or none has text). Adds what was skipped, with its places, to skipped."""
    lines_before, lines_seen = [], Counter()  # a file's lines in the units before this one: to number lines
    parts = {}
    for unit, report in zip(work.units, reports):
        first_source = unit.spans[0][0]
        lines_before.append(lines_seen[first_source] if len(unit.spans) == 1 else 0)
        lines_seen[first_source] += report.newlines
        if unit.part_of is not None:
            parts.setdefault(unit.part_of, []).append(report.index)
    kept = set(range(len(work.units)))
    for unit, report in zip(work.units, reports):  # in unit order, which is the order of the files
        if unit.part_of is None:
            for reason, count in report.skipped.items():
                places = [place_of(work.sources[source_index], line, lines_before[report.index])
                          for why, source_index, line in report.places if why == reason]
                skipped.add(reason, count, places)
            continue
        unit_indexes = parts[unit.part_of]
        if report.index != unit_indexes[0]:
            continue  # the file was judged at its first unit
        source = work.sources[unit.part_of]
        failed = [i for i in unit_indexes if reports[i].skipped]
        if failed:
            reason, _, line = reports[failed[0]].places[0]
            skipped.add(reason, 1, [place_of(source, line, lines_before[failed[0]])])
            kept -= set(unit_indexes)
        elif not any(reports[i].has_text for i in unit_indexes):
            skipped.add('empty', 1, [place_of(source, None)])
            kept -= set(unit_indexes)
    return kept


def balance(work, reports, kept):
    """The move that gives an empty split a document: (from split, {unit index: (first, end token)}), or
    (None, {}). It moves the document nearest the other side by its hash (a document cut into units: all its
    units), so the choice, like the split, does not depend on --num_proc."""
    documents = {s: sum(reports[i].documents[s] for i in kept) for s in SPLITS}
    if documents['train'] and documents['val']:
        return None, {}
    if documents['val'] == 0:
        from_split = 'train'
        candidates = [(reports[i].lowest_train, i) for i in sorted(kept) if reports[i].lowest_train]
        place, index = min(candidates, key=lambda candidate: candidate[0][0])
    else:
        from_split = 'val'
        candidates = [(reports[i].highest_val, i) for i in sorted(kept) if reports[i].highest_val]
        place, index = max(candidates, key=lambda candidate: candidate[0][0])
    part_of = work.units[index].part_of
    if part_of is None:
        return from_split, {index: (place[1], place[2])}
    units = [i for i in sorted(kept) if work.units[i].part_of == part_of]
    return from_split, {i: (0, reports[i].tokens[from_split]) for i in units}


def concatenate(work, reports, kept, moved_from, moves, out_folder):
    """train.bin and val.bin from the kept units' files in unit order, each file removed once copied; the
    moved token ranges go to the other split. The tokens per split."""
    tokens = dict.fromkeys(SPLITS, 0)
    outputs = {s: open(os.path.join(out_folder, f'{s}.bin'), 'wb') for s in SPLITS}
    with outputs['train'], outputs['val']:
        for index in range(len(work.units)):
            for split in SPLITS:
                path = unit_file(work.folder, index, split)
                if index in kept:
                    tokens[split] += reports[index].tokens[split]
                    with open(path, 'rb') as unit:
                        if split == moved_from and index in moves:
                            first, end = moves[index]
                            other = 'val' if split == 'train' else 'train'
                            copy_bytes(unit, outputs[split], 2 * first)
                            copy_bytes(unit, outputs[other], 2 * (end - first))
                            tokens[split] -= end - first
                            tokens[other] += end - first
                        shutil.copyfileobj(unit, outputs[split], CHUNK_BYTES)
                os.remove(path)
    return tokens


def split_tail(folder, tokens, val_fraction):
    """One document in folder's train.bin or val.bin: its first 1 - val_fraction of tokens to train.bin, the
    rest to val.bin, copied CHUNK_BYTES at a time. The tokens per split."""
    paths = {s: os.path.join(folder, f'{s}.bin') for s in SPLITS}
    if tokens['val']:  # the hash sent it to val: it starts over as train
        os.replace(paths['val'], paths['train'])
    total = sum(tokens.values())
    train_tokens = min(max(1, int(total * (1 - val_fraction))), total - 1)
    with open(paths['train'], 'r+b') as train, open(paths['val'], 'wb') as val:
        train.seek(2 * train_tokens)
        shutil.copyfileobj(train, val, CHUNK_BYTES)
        train.truncate(2 * train_tokens)
    return {'train': train_tokens, 'val': total - train_tokens}


def copy_bytes(source, destination, count):
    """Copies count bytes from one open file to another, CHUNK_BYTES at a time."""
    while count > 0:
        block = source.read(min(CHUNK_BYTES, count))
        if not block:
            return
        destination.write(block)
        count -= len(block)


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
        elif os.path.exists(target):  # e.g. a character vocabulary's meta.pkl, wrong for GPT-2 tokens
            os.remove(target)
    shutil.rmtree(partial)


def character_vocabulary(work, num_proc):
    """The first pass of --tokenizer char: meta.pkl's dict, from every character of the documents kept.
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
    """Tokenizes the sources into partial: train.bin, val.bin, meta.pkl (char), prepare.json."""
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
        with open(os.path.join(partial, 'meta.pkl'), 'wb') as f:
            pickle.dump(meta, f)
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
        from ds_setup import die  # only now: it loads torch
        die(str(e))
