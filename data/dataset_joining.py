"""
The joining side of data/prepare.py: each unit's tokens are in files of their own (unit_file); from the units'
Reports this decides which units make the dataset and sums up what was skipped (keep_units), gives an empty
split a document (balance), joins the kept files in unit order into train.bin and val.bin (concatenate), and
splits a corpus of one document by its tail (split_tail), copying COPY_BYTES at a time.
"""
import os
import shutil
from collections import Counter

from corpus_reading import MAX_PLACES, SPLITS

COPY_BYTES = 1 << 20  # copied at a time between token files: memory stays bounded whatever their size


def unit_file(folder, index, split):
    """Where unit index writes its tokens of split, and where concatenate finds them."""
    return os.path.join(folder, f'{index:07d}.{split}')


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
                        shutil.copyfileobj(unit, outputs[split], COPY_BYTES)
                os.remove(path)
    return tokens


def split_tail(folder, tokens, val_fraction):
    """One document in folder's train.bin or val.bin: its first 1 - val_fraction of tokens to train.bin, the
    rest to val.bin, copied COPY_BYTES at a time. The tokens per split."""
    paths = {s: os.path.join(folder, f'{s}.bin') for s in SPLITS}
    if tokens['val']:  # the hash sent it to val: it starts over as train
        os.replace(paths['val'], paths['train'])
    total = sum(tokens.values())
    train_tokens = min(max(1, int(total * (1 - val_fraction))), total - 1)
    with open(paths['train'], 'r+b') as train, open(paths['val'], 'wb') as val:
        train.seek(2 * train_tokens)
        shutil.copyfileobj(train, val, COPY_BYTES)
        train.truncate(2 * train_tokens)
    return {'train': train_tokens, 'val': total - train_tokens}


def copy_bytes(source, destination, count):
    """Copies count bytes from one open file to another, COPY_BYTES at a time."""
    while count > 0:
        block = source.read(min(COPY_BYTES, count))
        if not block:
            return
        destination.write(block)
        count -= len(block)
