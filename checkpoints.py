"""
Checkpoint folders on disk, for train_deepspeed.py: which tag to resume, putting a finished save in place,
rotation, the disk check, and checksums. DeepSpeed writes and reads the shards; this only moves folders
around it, so that a run killed at any moment leaves `latest` naming a complete tag.

A tag folder is complete when it has no '.' in its name: saves are written to <tag>.partial and renamed
into place, an overwritten tag is parked as <tag>.old, and a rotated one is renamed <tag>.removing first.
"""
import json
import os
import random
import re
import shutil
import zlib

import numpy as np
import torch

CHECKSUMS = 'checksums.json'


def tag_to_resume(out_dir, resume_tag=''):
    """(tag, folder to load). ValueError with the fix when there is nothing to resume. A kill between parking
    an older <tag> as <tag>.old and renaming the new save into place leaves only <tag>.old: that one is used."""
    tag = resume_tag
    if not tag:
        latest = os.path.join(out_dir, 'latest')
        if not os.path.isfile(latest):
            found = sorted(complete_tags(out_dir) if os.path.isdir(out_dir) else [],
                           key=lambda t: (t == 'final', int(t[5:]) if re.fullmatch(r'iter_\d+', t) else -1))
            raise ValueError(f'nothing to resume: {latest} not found; '
                             + (f"resume a tag with --resume_tag={found[-1]} (found: {', '.join(found)})" if found else
                                'start with --init_from=scratch or a pretrained model'))
        with open(latest) as f:
            tag = f.read().strip()
    folder = loadable_folder(out_dir, tag)
    if folder:
        return tag, folder
    found = ', '.join(complete_tags(out_dir)) if os.path.isdir(out_dir) else ''
    raise ValueError(f'no checkpoint at {os.path.join(out_dir, tag)}: name an existing tag with --resume_tag'
                     + (f' ({found})' if found else f' (there is none in {out_dir})'))


def loadable_folder(out_dir, tag):
    """<tag>, or <tag>.old when a kill landed between parking the older save and renaming the new one in; None."""
    return next((f for f in (tag, tag + '.old') if shard_files(os.path.join(out_dir, f))), None)


def existing_ancestor(path):
    """path, or the nearest folder above it that exists (what a folder yet to be made will live on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith('.pt')) if os.path.isdir(folder) else []


def complete_tags(out_dir):
    return sorted(d for d in os.listdir(out_dir) if '.' not in d and shard_files(os.path.join(out_dir, d)))


def read_saved(folder):
    """What the trainer needs before building the engine: the model shape, the saved world size and ZeRO stage,
    and whether ds_to_universal made the folder. Reads only the small client state (mmap), not the weights."""
    states = sorted(f for f in shard_files(folder) if f.endswith('model_states.pt'))
    path = os.path.join(folder, states[0]) if states else folder
    try:
        saved = torch.load(path, map_location='cpu', mmap=True, weights_only=False)
        return dict(model_args=saved['model_args'], world_size=saved['dp_world_size'],
                    dtype=saved.get('config', {}).get('dtype'),
                    stage=saved['ds_config'].get('zero_optimization', {}).get('stage', 0),
                    universal=os.path.isdir(os.path.join(folder, 'zero')))
    except Exception as e:  # truncated, overwritten, not ours: say which file, not a stack trace
        raise ValueError(f'{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}): the checkpoint '
                         f'is damaged or incomplete; resume from another tag with --resume_tag') from None


def owned_by(name, rank):
    """The rank that checksums a file: DeepSpeed names each rank's zero_pp_rank_<r>_...; rank 0 takes the rest."""
    match = re.search(r'zero_pp_rank_(\d+)_', name)
    return (int(match.group(1)) if match else 0) == rank


def crc32_of(path, chunk_bytes=64 << 20):
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksum_own_files(folder, rank):
    """{file: [bytes, crc32]} for this rank's files. torch.load reads a flipped byte inside a tensor without
    complaint (a zip's CRC is not checked), so the save records one, each rank its own share, while the file
    is still in the page cache."""
    return {f: [os.path.getsize(os.path.join(folder, f)), crc32_of(os.path.join(folder, f))]
            for f in shard_files(folder) if owned_by(f, rank)}


def write_checksums(folder, sums):
    with open(os.path.join(folder, CHECKSUMS), 'w') as f:
        json.dump(sums, f, indent=0, sort_keys=True)


def verify_own_files(folder, rank):
    """'' when this rank's files match what the save recorded, else what is wrong (the file and how)."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return ''  # saved before checksums existed, or by DeepSpeed directly: nothing to compare with
    with open(path) as f:
        sums = json.load(f)
    for name, (size, crc) in sorted(sums.items()):
        if not owned_by(name, rank):
            continue
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f'{file} is missing'
        if os.path.getsize(file) != size:
            return f'{file} has {os.path.getsize(file):,} bytes, the save wrote {size:,}'
        if crc32_of(file) != crc:
            return f'{file} does not match the checksum written when it was saved'
    return ''


def swap_in(partial, tag_dir):
    """Put a finished save in place of an older one of its tag, then point 'latest' at it, each step a rename.
    A kill between the first two renames leaves <tag>.old alone, which tag_to_resume falls back on."""
    if os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir + '.old', ignore_errors=True)  # a kill while removing it left some: <tag> is complete
        os.replace(tag_dir, tag_dir + '.old')
    os.replace(partial, tag_dir)
    shutil.rmtree(tag_dir + '.old', ignore_errors=True)
    out_dir = os.path.dirname(tag_dir)
    with open(os.path.join(out_dir, 'latest.tmp'), 'w') as f:
        f.write(os.path.basename(tag_dir))
    os.replace(os.path.join(out_dir, 'latest.tmp'), os.path.join(out_dir, 'latest'))


def put_in_place(partial, tag_dir, sums, keep_last_n, keep):
    """A finished save: its checksums (every rank's share), the swap, then the rotation. Returns the removed tags."""
    write_checksums(partial, {name: crc for rank_sums in sums for name, crc in rank_sums.items()})
    swap_in(partial, tag_dir)
    return rotate(os.path.dirname(tag_dir), keep_last_n, keep)


def rotate(out_dir, keep_last_n, keep):
    """Remove iter_<n> tags beyond the newest keep_last_n, never one named in keep (the best, the one just saved);
    'final' and any other name are not iter_<n> and so never removed. Returns the removed tags."""
    iters = sorted((int(m.group(1)), d) for d in complete_tags(out_dir) if (m := re.fullmatch(r'iter_(\d+)', d)))
    doomed = [d for _, d in iters[:-keep_last_n] if d not in keep]
    for d in doomed:  # renamed first: a kill mid-delete leaves no half-folder that looks like a tag
        os.replace(os.path.join(out_dir, d), os.path.join(out_dir, d + '.removing'))
        shutil.rmtree(os.path.join(out_dir, d + '.removing'), ignore_errors=True)
    return doomed


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) if os.path.isdir(folder) else 0


def size(n_bytes):
    return f'{n_bytes / 2**30:.2f} GiB' if n_bytes >= 2**30 else f'{n_bytes / 2**20:.1f} MiB'


def checkpoint_bytes(n_params, dtype):
    """About what one checkpoint of n_params takes on disk before the first save has shown it: the weights
    (4 bytes in fp32, else 2; dtype 'auto' is 16-bit, as on a GPU) and 12 bytes of fp32 Adam states (master
    copy, two moments) per parameter."""
    return n_params * ((4 if dtype == 'float32' else 2) + 12)


def disk_shortfall(out_dir, n_params, dtype, min_free_disk_mb):
    """'' when out_dir's disk has room for one more checkpoint plus min_free_disk_mb, else the line that says so.
    The need is the newest checkpoint's size, before the first save checkpoint_bytes."""
    latest = os.path.join(out_dir, 'latest')
    need = 0
    if os.path.isfile(latest):
        with open(latest) as f:
            need = folder_bytes(os.path.join(out_dir, f.read().strip()))
    need = need or checkpoint_bytes(n_params, dtype)
    free = shutil.disk_usage(existing_ancestor(out_dir)).free  # a node with its own disk may not have made it yet
    if free - need >= min_free_disk_mb * 2**20:
        return ''
    return (f'{out_dir} has {size(free)} free, a checkpoint needs about {size(need)} plus '
            f'min_free_disk_mb={min_free_disk_mb}: stopped before writing it; free space (or lower --keep_last_n) '
            f'and resume with --init_from=resume')


def rng_streams(batch_rng):
    """This rank's random streams, saved in every checkpoint: a resumed run draws what an unbroken one would."""
    return {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            'batch': batch_rng.bit_generator.state}


def restore_rng_streams(streams, batch_rng):
    random.setstate(streams['python'])
    np.random.set_state(streams['numpy'])
    torch.set_rng_state(streams['torch'])
    if torch.cuda.is_available() and streams.get('cuda') is not None:
        torch.cuda.set_rng_state(streams['cuda'])
    batch_rng.bit_generator.state = streams['batch']
