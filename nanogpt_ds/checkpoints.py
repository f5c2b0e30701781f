"""
The checkpoint folder, and the only code that knows its layout. DeepSpeed writes and reads the shards; this
module says where, and keeps the folder such that a run killed at any moment resumes from a complete tag.

out_dir/
  <tag>/            a complete checkpoint: DeepSpeed's files for each rank, checksums.json, the client state
  <tag>.partial/    a save under way: every save is written here, then renamed to <tag>
  <tag>.old/        an older <tag> parked while the new one is renamed in (a kill between leaves only this)
  <tag>.removing/   a rotated tag, renamed before it is deleted
  latest            the newest complete tag
  meta.json         the run's character vocabulary (none for GPT-2 BPE; meta.pkl from older runs)

The public surface: check_writable, to_resume, use_node_disks, check_before_load and resume (the trainer's
start), check_disk, save, keep_vocabulary, complete_tags and latest_tag. consolidate.py reads a checkpoint
back as one model, for export.py and sample.py.

Nodes that save to disks of their own (no shared file system) each keep such a folder, with their own ranks'
shards, a copy of the model states and their own 'latest'.
"""
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist

from model import num_params
from nanogpt_ds import data_sources

CHECKSUMS = 'checksums.json'
LATEST = 'latest'


# -----------------------------------------------------------------------------
# the layout: which folders are tags, which files are whose

def shard_files(folder):
    """DeepSpeed's files in a tag folder. ZeRO 0-2 write mp_rank_00_model_states.pt (weights and client state)
    and, for ZeRO 1-2, zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank; ZeRO-3 writes both per rank."""
    return sorted(f for f in os.listdir(folder) if f.endswith('.pt')) if os.path.isdir(folder) else []


def model_states_file(folder):
    """The path of the file that holds the client state (rank 0's model states), or None."""
    states = [f for f in shard_files(folder) if f.endswith('model_states.pt')]
    return os.path.join(folder, states[0]) if states else None


def owned_by(name, rank, node_disks=False):
    """Whether a rank wrote a file. DeepSpeed names each rank's files zero_pp_rank_<r>_...; the rest (ZeRO
    0-2's mp_rank_00_model_states.pt) rank 0 writes, and with node_disks (the nodes save to disks of their
    own) the first rank of every node writes a copy on its node's disk."""
    match = re.search(r'zero_pp_rank_(\d+)_', name)
    if match:
        return int(match.group(1)) == rank
    first_on_node = int(os.environ.get('LOCAL_RANK', '0')) == 0
    return rank == 0 or (node_disks and first_on_node)


def files_of_rank(folder, rank, node_disks=False):
    return [f for f in shard_files(folder) if owned_by(f, rank, node_disks)]


def complete_tags(out_dir):
    """The tags a run can resume from: folders with shards and no '.' (not .partial, .old or .removing)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if '.' not in d and shard_files(os.path.join(out_dir, d)))


def latest_tag(out_dir):
    """The tag out_dir/latest names, or None."""
    path = os.path.join(out_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def loadable_folder(out_dir, tag):
    """<tag>, or <tag>.old when a kill came between parking the older save and renaming the new one in."""
    for folder in (tag, tag + '.old'):
        if shard_files(os.path.join(out_dir, folder)):
            return folder
    return None


def iter_number(tag):
    """n of an iter_<n> tag, None for any other name ('final', 'iter_8_universal', ...)."""
    numbered = re.fullmatch(r'iter_(\d+)', tag)
    return int(numbered.group(1)) if numbered else None


def newest_last(tag):
    """Sort key: other names, then iter_<n> by n, then 'final'."""
    n = iter_number(tag)
    return (tag == 'final', -1 if n is None else n)


def iter_tags_by_age(out_dir):
    """(iter number, tag) of the iter_<n> tags, oldest first."""
    return sorted((iter_number(tag), tag) for tag in complete_tags(out_dir) if iter_number(tag) is not None)


def check_writable(out_dir):
    """ValueError with the fix when out_dir cannot be made or written: found before anything is trained."""
    writable = existing_ancestor(out_dir)
    if not os.path.isdir(writable) or not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f'out_dir={out_dir} cannot be written ({writable} is not a writable folder): use '
                         f'another --out_dir')


def existing_ancestor(path):
    """path, or the nearest folder above it that exists (what a folder yet to be made will live on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# -----------------------------------------------------------------------------
# resume: to_resume (files only, before the process group), check_before_load, resume (after the engine)

def to_resume(out_dir, resume_tag=''):
    """What the trainer needs before it builds the engine: {tag, folder (the folder name to load: <tag> or
    <tag>.old), dir, model_args, world_size, stage, dtype, universal}. ValueError with the fix when there is
    nothing to resume. Reads only the small client state (mmap), not the weights."""
    tag = resume_tag or latest_tag(out_dir)
    if not tag:
        found = sorted(complete_tags(out_dir), key=newest_last)
        hint = 'start with --init_from=scratch or a pretrained model'
        if found:
            hint = f"resume a tag with --resume_tag={found[-1]} (found: {', '.join(found)})"
        raise ValueError(f'nothing to resume: {os.path.join(out_dir, LATEST)} not found; {hint}')
    folder = loadable_folder(out_dir, tag)
    if not folder:
        found = ', '.join(complete_tags(out_dir))
        listing = f' ({found})' if found else f' (there is none in {out_dir})'
        raise ValueError(f'no checkpoint at {os.path.join(out_dir, tag)}: name an existing tag with '
                         f'--resume_tag{listing}')
    tag_dir = os.path.join(out_dir, folder)
    saved = read_client_state(tag_dir)
    return dict(tag=tag, folder=folder, dir=tag_dir, model_args=saved['model_args'],
                world_size=saved['dp_world_size'], stage=zero_stage(saved),
                dtype=saved.get('config', {}).get('dtype'), universal=is_universal(tag_dir))


def read_client_state(tag_dir):
    """The model-states file of a tag: DeepSpeed's own keys and the client state the trainer saved, its
    weights memory-mapped. ValueError naming the file when it cannot be read."""
    path = model_states_file(tag_dir) or tag_dir
    try:
        return torch.load(path, map_location='cpu', mmap=True, weights_only=False)
    except Exception as e:  # truncated, overwritten, not ours: say which file, not a stack trace
        reason = str(e).splitlines()[0][:120] if str(e) else ''
        raise ValueError(f'{path} cannot be read ({type(e).__name__}: {reason}): the checkpoint is damaged '
                         f'or incomplete; resume from another tag with --resume_tag') from None


def zero_stage(client_state):
    return client_state['ds_config'].get('zero_optimization', {}).get('stage', 0)


def is_universal(tag_dir):
    """Whether ds_to_universal made the folder: one fp32 file per parameter under zero/, any world size."""
    return os.path.isdir(os.path.join(tag_dir, 'zero'))


def use_node_disks(out_dir, ds_config):
    """Collective, before the engine is built: whether the nodes save to disks of their own (no shared file
    system: some node does not see a file rank 0 writes in out_dir). Then DeepSpeed's use_node_local_storage
    has the first rank of every node write the model states too, so that each node resumes from its own disk,
    and each node keeps its own 'latest'. Returns that answer."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # in out_dir, or the folder it will be made in: a run stopped on bad input leaves no out_dir behind
    probe = os.path.join(existing_ancestor(out_dir), f'.node-probe-{socket.gethostname()}-{time.time_ns()}')
    if rank == 0:
        open(probe, 'w').close()
    probes = [None] * world_size
    dist.all_gather_object(probes, probe)  # rank 0's name, once its file is written
    seen = os.path.exists(probes[0])
    if not seen:  # a network file system may show a new file a moment late
        time.sleep(0.5)
        seen = os.path.exists(probes[0])
    everyone_sees = [None] * world_size
    dist.all_gather_object(everyone_sees, seen)
    if rank == 0:
        os.remove(probe)
    node_disks = not all(everyone_sees)
    if node_disks:
        ds_config['checkpoint'] = {**ds_config.get('checkpoint', {}), 'use_node_local_storage': True}
    return node_disks


def check_before_load(saved, ds_config, world_size, node_disks):
    """Collective, after the process group starts. The nodes agree on the tag: when their disks' newest
    differ (a save cut short on one node), every rank resumes the newest tag complete on every disk. Then
    every rank checks its own files against the checksums of the save; a universal checkpoint loads as one.
    Returns saved (for another tag, if the nodes agreed on one). ValueError (on every rank) when no tag is
    complete on every node, when the checkpoint is damaged, or holds ZeRO shards for another number of ranks
    (with the command that converts it)."""
    saved = agree_on_tag(saved, world_size)
    problems = [None] * world_size
    dist.all_gather_object(problems, verify_own_files(saved['dir'], dist.get_rank(), node_disks))
    found = [p for p in problems if p]
    if found:
        others = ', '.join(t for t in complete_tags(os.path.dirname(saved['dir'])) if t != saved['folder'])
        raise ValueError(f'{found[0]}: the checkpoint is damaged; resume from another tag with --resume_tag '
                         f"({others or 'there is none'})")
    if saved['universal']:
        ds_config['checkpoint'] = {**ds_config.get('checkpoint', {}), 'load_universal': True}
        return saved
    if saved['stage'] > 0 and saved['world_size'] != world_size:
        tag_dir = saved['dir']
        raise ValueError(
            f"{tag_dir} holds ZeRO-{saved['stage']} shards for {saved['world_size']} ranks, this run has "
            f'{world_size}: convert it once with `{sys.executable} -m deepspeed.checkpoint.ds_to_universal '
            f'--inject_missing_state --input_folder {tag_dir} --output_folder {tag_dir}_universal` and '
            f"resume with --resume_tag={saved['tag']}_universal")
    return saved


def agree_on_tag(saved, world_size):
    """saved, or what to_resume says of the newest tag complete on every node's disk when the nodes' newest
    differ (its 'note' says so). ValueError when no tag is complete on every node."""
    out_dir = os.path.dirname(saved['dir'])
    views = [None] * world_size
    dist.all_gather_object(views, (saved['tag'], socket.gethostname(), complete_tags(out_dir)))
    if len({tag for tag, _, _ in views}) == 1:
        return saved
    newest = {host: tag for tag, host, _ in views}
    differ = ', '.join(f'{host} has {tag}' for host, tag in newest.items())
    on_every_node = set.intersection(*(set(tags) for _, _, tags in views))
    if not on_every_node:
        raise ValueError(f'no checkpoint is complete on every node ({differ}): copy one tag folder to the '
                         f'nodes that lack it and resume with --resume_tag=TAG')
    tag = max(on_every_node, key=newest_last)
    note = (f'note: the nodes disagree on the newest checkpoint ({differ}: a save cut short); resuming '
            f'{tag}, the newest on every node')
    return {**to_resume(out_dir, tag), 'note': note}


def resume(engine, saved, batch_rng, seed):
    """Load the checkpoint into the engine and continue this rank's random streams. Returns (client state,
    what rank 0 prints: where it resumed, and how). ValueError when DeepSpeed cannot load this rank's files:
    this rank alone may know it."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        load_path, client = engine.load_checkpoint(os.path.dirname(saved['dir']), tag=saved['folder'])
    except Exception as e:  # this rank's shard; the launcher stops the others
        load_path, reason = None, str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    else:
        reason = 'nothing found'  # DeepSpeed returns (None, None) for a folder it finds nothing in
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load {saved['dir']} on rank {rank} ({reason}): resume from "
                         f'another tag with --resume_tag')
    saved_ranks, iter_num = len(client['rng_states']), client['iter_num']
    said = f"resumed at iter {iter_num} from {saved['dir']}"
    if saved.get('note'):
        said = f"{saved['note']}\n{said}"
    if saved_ranks == world_size:  # every rank continues its own random streams
        restore_rng_streams(client['rng_states'][rank], batch_rng)
        return client, said
    # fresh streams, new to each rank: continuing, but not what an unbroken run would have drawn
    batch_rng.bit_generator.state = np.random.default_rng([seed, rank, iter_num]).bit_generator.state
    torch.manual_seed(seed + rank + 1000 * iter_num)
    return client, (f'{said}\nnote: {saved_ranks} ranks saved this checkpoint, {world_size} resume it: the '
                    f'weights and optimizer carry over, the batch order starts afresh')


def rng_streams(batch_rng):
    """This rank's random streams, saved in every checkpoint: a resumed run draws what an unbroken one did."""
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


# -----------------------------------------------------------------------------
# save

def save(engine, out_dir, tag, client_state, batch_rng, keep_last_n, keep, min_free_disk_mb):
    """Collective: every rank writes its shards and their checksums into <tag>.partial, rank 0 also the client
    state with every rank's random streams; then rank 0 (and the first rank of a node with a disk of its own)
    swaps it in for an older <tag>, points 'latest' at it and removes the iter_* tags beyond keep_last_n,
    never one in keep. A kill at any moment, or a save by another number of ranks over an older tag, leaves
    'latest' naming a complete folder. Returns the line that says so, with the tags removed (rank 0's).
    ValueError on every rank, before anything is written, when a node's disk has no room for it."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    first_on_node = int(os.environ.get('LOCAL_RANK', '0')) == 0
    node_disks = engine.use_node_local_storage()  # use_node_disks asked for it
    shortfall = ''
    if first_on_node:
        shortfall = disk_shortfall(out_dir, engine_params(engine), engine_dtype(engine), min_free_disk_mb)
    gathered = [None] * world_size  # every rank's random streams, each node's free disk
    dist.all_gather_object(gathered, (rng_streams(batch_rng), shortfall))
    shortfalls = [short for _, short in gathered if short]
    if shortfalls:
        raise ValueError(shortfalls[0])
    client = {**client_state, 'rng_states': [streams for streams, _ in gathered]}
    tag_dir, partial = os.path.join(out_dir, tag), os.path.join(out_dir, tag + '.partial')
    if first_on_node and os.path.isdir(partial):
        shutil.rmtree(partial, ignore_errors=True)  # the remains of a killed save
    dist.barrier()
    engine.save_checkpoint(out_dir, tag=tag + '.partial', client_state=client, save_latest=False)
    sums = [None] * world_size  # also the barrier: every shard is written before anyone moves the folder
    dist.all_gather_object(sums, checksum_own_files(partial, rank, node_disks))
    removed = []
    if rank == 0:
        removed = put_in_place(partial, tag_dir, sums, keep_last_n, keep)
    dist.barrier()
    if first_on_node and os.path.isdir(partial):  # a node whose out_dir is its own disk, not rank 0's
        put_in_place(partial, tag_dir, sums, keep_last_n, keep)
    dist.barrier()  # nobody reads or writes out_dir/<tag> before it is in place
    rotated = f" (removed {', '.join(removed)})" if removed else ''
    return f'saved checkpoint {tag_dir}{rotated}'


def engine_params(engine):
    """The model's parameter count, also under ZeRO-3 (whose parameters hold only a partition: ds_numel)."""
    return sum(getattr(p, 'ds_numel', p.numel()) for p in engine.module.parameters())


def engine_dtype(engine):
    if engine.bfloat16_enabled():
        return 'bfloat16'
    return 'float16' if engine.fp16_enabled() else 'float32'


def crc32_of(path, chunk_bytes=64 << 20):
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksum_own_files(folder, rank, node_disks):
    """{file: [bytes, crc32, host]} for this rank's files. torch.load reads a flipped byte inside a tensor
    without complaint (a zip's CRC is not checked), so the save records one, each rank its own share, while
    the file is still in the page cache; and the host, for nodes with disks of their own."""
    sums = {}
    for name in files_of_rank(folder, rank, node_disks):
        path = os.path.join(folder, name)
        sums[name] = [os.path.getsize(path), crc32_of(path), socket.gethostname()]
    return sums


def read_checksums(folder):
    """{file: [bytes, crc32, host]} as the save recorded them ({} for a folder saved without); a checkpoint
    from before hosts were recorded names none ('')."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return {}  # saved before checksums existed, or by DeepSpeed directly: nothing to compare with
    with open(path) as f:
        return {name: [*entry, ''][:3] for name, entry in json.load(f).items()}


def verify_own_files(folder, rank, node_disks=False):
    """'' when this rank's files match what the save recorded, else what is wrong (the file and how)."""
    for name, (size, crc, _) in sorted(read_checksums(folder).items()):
        if not owned_by(name, rank, node_disks):
            continue
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f'{file} is missing'
        if os.path.getsize(file) != size:
            return f'{file} has {os.path.getsize(file):,} bytes, the save wrote {size:,}'
        if crc32_of(file) != crc:
            return f'{file} does not match the checksum written when it was saved'
    return ''


def put_in_place(partial, tag_dir, sums, keep_last_n, keep):
    """A finished save: its checksums (every rank's share; of a file every node wrote, this node's copy), the
    swap, the rotation. Returns removed tags."""
    every_file = {}
    for rank_sums in sums:
        for name, entry in rank_sums.items():
            if name not in every_file or entry[2] == socket.gethostname():
                every_file[name] = entry
    with open(os.path.join(partial, CHECKSUMS), 'w') as f:
        json.dump(every_file, f, indent=0, sort_keys=True)
    swap_in(partial, tag_dir)
    return rotate(os.path.dirname(tag_dir), keep_last_n, keep)


def swap_in(partial, tag_dir):
    """Put a finished save in place of an older one of its tag, then point 'latest' at it, each step a rename.
    A kill between the first two renames leaves <tag>.old alone, which to_resume falls back on."""
    if os.path.isdir(tag_dir):
        # a kill while removing <tag>.old left some of it: <tag> is complete
        shutil.rmtree(tag_dir + '.old', ignore_errors=True)
        os.replace(tag_dir, tag_dir + '.old')
    os.replace(partial, tag_dir)
    shutil.rmtree(tag_dir + '.old', ignore_errors=True)
    out_dir = os.path.dirname(tag_dir)
    with open(os.path.join(out_dir, LATEST + '.tmp'), 'w') as f:
        f.write(os.path.basename(tag_dir))
    os.replace(os.path.join(out_dir, LATEST + '.tmp'), os.path.join(out_dir, LATEST))


def rotate(out_dir, keep_last_n, keep):
    """Remove iter_<n> tags beyond the newest keep_last_n, never one named in keep (the best, the one just
    saved); 'final' and any other name are not iter_<n> and so never removed. Returns the removed tags."""
    by_age = [tag for _, tag in iter_tags_by_age(out_dir)]
    doomed = [tag for tag in by_age[:-keep_last_n] if tag not in keep]
    for tag in doomed:  # renamed first: a kill mid-delete leaves no half-folder that looks like a tag
        os.replace(os.path.join(out_dir, tag), os.path.join(out_dir, tag + '.removing'))
        shutil.rmtree(os.path.join(out_dir, tag + '.removing'), ignore_errors=True)
    return doomed


def folder_bytes(folder):
    if not os.path.isdir(folder):
        return 0
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def size(n_bytes):
    return f'{n_bytes / 2**30:.2f} GiB' if n_bytes >= 2**30 else f'{n_bytes / 2**20:.1f} MiB'


def checkpoint_bytes(n_params, dtype):
    """About what one checkpoint of n_params takes on disk before the first save has shown it: the weights
    (4 bytes in fp32, else 2; dtype 'auto' is 16-bit, as on a GPU) and 12 bytes of fp32 Adam states (master
    copy, two moments) per parameter."""
    return n_params * ((4 if dtype == 'float32' else 2) + 12)


def check_disk(out_dir, shape, dtype, min_free_disk_mb):
    """At the start: ValueError when out_dir's disk cannot hold the first save, found before any training."""
    shortfall = disk_shortfall(out_dir, num_params(shape), dtype, min_free_disk_mb, at_start=True)
    if shortfall:
        raise ValueError(shortfall)


def disk_shortfall(out_dir, n_params, dtype, min_free_disk_mb, at_start=False):
    """'' when out_dir's disk has room for one more checkpoint plus min_free_disk_mb, else the line that says
    so, at the start of a run (nothing trained yet) or at a save. The need is the newest checkpoint's size,
    before the first save checkpoint_bytes."""
    newest = latest_tag(out_dir)
    need = folder_bytes(os.path.join(out_dir, newest)) if newest else 0
    need = need or checkpoint_bytes(n_params, dtype)
    # a node with its own disk may not have made out_dir yet
    free = shutil.disk_usage(existing_ancestor(out_dir)).free
    if free - need >= min_free_disk_mb * 2**20:
        return ''
    short = (f'{out_dir} has {size(free)} free, a checkpoint needs about {size(need)} plus '
             f'min_free_disk_mb={min_free_disk_mb}')
    if at_start:
        return f'{short}: stopped before training; free space (or lower --min_free_disk_mb) and start again'
    then = 'resume with --init_from=resume' if newest else 'start again (nothing was saved to resume from)'
    return f'{short}: stopped before writing it; free space (or lower --keep_last_n) and {then}'


def keep_vocabulary(out_dir, meta_path):
    """The dataset's vocabulary as out_dir/meta.json (an old meta.pkl's too): it travels with the run, for
    sample/export."""
    meta = data_sources.read_meta(meta_path)
    if meta is not None:  # None: GPT-2 BPE, nothing to keep
        data_sources.write_meta(out_dir, meta)
