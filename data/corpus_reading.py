"""
The reading side of data/prepare.py: which files the inputs name (Source), the units the work is cut into
(Unit), and the documents a unit holds, handed to a sink with what was skipped told in the unit's Report.

Memory stays bounded whatever the corpus: the work is cut into units of about UNIT_BYTES of input, from the
file list alone, so the units (and the output) do not depend on --num_proc; text is read CHUNK_BYTES at a
time and JSON Lines a line at a time. A big text file is cut at line ends where GPT-2's BPE gives the same
tokens as for the whole text (EXACT_CUT), so a document cut into several units tokenizes as it would whole.
A gzip file is one unit however big (it cannot be cut).

A sink takes a unit's documents: begin(split, hash), write(text) any number of times, then end() (or
end(end_of_document=False) for a part of a document cut into units), or drop() to take the document back;
close() when the unit is done. data/prepare.py has two: one tokenizes, one collects the characters.
"""
import codecs
import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

SPLITS = ('train', 'val')
# The work is cut into units of about this much input, whatever --num_proc is, so the output is too: small
# files are packed together, a bigger one is cut at line ends (a gzip file, which cannot be cut, is one unit).
UNIT_BYTES = 4 << 20
CHUNK_BYTES = 1 << 20  # read and tokenized at a time: memory stays bounded whatever the size of a file
MAX_BUFFER_BYTES = 4 << 20  # text carried over while looking for a cut that BPE cannot tell from no cut
HEAD_BYTES = 8192  # a NUL byte in this many first bytes makes a file binary
MAX_PLACES = 3  # places listed per reason a document was skipped
# Where a text can be cut and tokenized in two pieces with the same GPT-2 tokens as in one: after a line end
# that has a printable ASCII character on each side. GPT-2's pre-tokenizer always splits there (a piece never
# runs from a line end into a non-space), and the whitespace piece is the '\n' alone either way. A cut
# elsewhere (next to more whitespace, as before an indented line) can merge '\n' with the spaces after it in
# one text and not in two.
EXACT_CUT = re.compile(rb'[\x21-\x7e]\n(?=[\x21-\x7e])')


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


def read_unit(work, report, sink):
    """Reads the documents of unit report.index into sink; what cannot be used goes into report as skipped."""
    for source_index, start, end in work.units[report.index].spans:
        source = work.sources[source_index]
        report.input_bytes += span_bytes(source, start, end)
        try:
            if source.size == 0:
                report.skip('empty', source_index)
            elif is_binary(source):
                report.skip('binary (NUL bytes)', source_index)
            elif source.jsonl:
                read_jsonl(work, source_index, start, end, sink, report)
            else:
                read_text(work, source_index, start, end, sink, report)
        except (OSError, EOFError, zlib.error) as e:  # unreadable, or a broken gzip stream
            sink.drop()
            report.skip(f'unreadable ({type(e).__name__})', source_index)


def span_bytes(source, start, end):
    return (source.size if end is None else end) - start


def open_input(source):
    return gzip.open(source.path, 'rb') if source.gz else open(source.path, 'rb')


def is_binary(source):
    with open_input(source) as f:
        return b'\0' in f.read(HEAD_BYTES)


def has_text(text):
    return bool(text) and not text.isspace()


def read_jsonl(work, source_index, start, end, sink, report):
    """One document a line: the string in the line's text field. A line that fails is skipped alone; a blank
    line is no document."""
    source = work.sources[source_index]
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
                text, unusable = jsonl_text(raw, work.text_field)
                if unusable:
                    report.skip(unusable, source_index, line)
                else:
                    split, doc_hash = split_of(work.seed, source.path, line_offset, work.val_fraction)
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


def read_text(work, source_index, start, end, sink, report):
    """A plain-text document (or a unit's part of one), read and tokenized about CHUNK_BYTES at a time. A
    chunk ends at an EXACT_CUT line end, so GPT-2's tokens are those of the whole text; only a text without
    one for MAX_BUFFER_BYTES is cut at another line end (or anywhere, without a line end), where its tokens
    may differ from those of one pass over the whole text. The document is dropped if any of it is not
    UTF-8, or all of it is whitespace."""
    source = work.sources[source_index]
    is_part = work.units[report.index].part_of is not None
    split, doc_hash = split_of(work.seed, source.path, 0, work.val_fraction)
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
