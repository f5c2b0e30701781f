"""The shipped offload JSONs run for real on 2 CPU ranks: ZeRO-2 with the optimizer on the CPU, ZeRO-3 with
the optimizer and the parameters there. DeepSpeed's CPU Adam steps the optimizer (DeepSpeed refuses a torch
one there) with the same groups, betas and schedule: the losses are torch AdamW's. ZeRO-3's run, parameters
and optimizer on the CPU, resumes exactly and exports. ZeRO-2 offload's checkpoint has plain ZeRO-2's files,
whose resume and export other tests hold; its resume was checked exact once and left out of the suite for
time. Started with another ninja first on PATH (the system's, of another version), the run still builds CPU
Adam with its own venv's: each ninja takes the other's build for stale and rebuilds it. The build lives in the
venv, not in a cache two venvs share."""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import SAVED_RUN, by_iter, env, expected_eval, launch, metrics, ok, run

from model import GPT, GPTConfig
from nanogpt_ds import checkpoints

ZERO2, ZERO3 = 'ds_config_zero2_offload.json', 'ds_config_zero3_offload.json'


def with_other_ninja(folder):
    """An environment whose PATH starts with a ninja that fails, and leaves folder/other_ninja_ran if run."""
    other_ninja = folder / 'bin' / 'ninja'
    other_ninja.parent.mkdir(parents=True)
    other_ninja.write_text(f'#!/bin/sh\ntouch {folder}/other_ninja_ran\nexit 1\n')
    other_ninja.chmod(0o755)
    return env(PATH=f"{other_ninja.parent}{os.pathsep}{os.environ['PATH']}")


def zero2_run(folder):
    """saved_run's run with the ZeRO-2 offload JSON."""
    out = folder / 'out'
    return dict(out=out, proc=launch([*SAVED_RUN, f'--deepspeed_config={ZERO2}', f'--out_dir={out}'],
                                     environ=with_other_ninja(folder)))


def zero3_run(folder):
    """saved_run's run with the ZeRO-3 offload JSON, stopped at iter 6 (saving final there) and resumed to
    its end at 10, the schedule of 10 iterations throughout; then exported."""
    out, environ = folder / 'out', with_other_ninja(folder)
    args = [*SAVED_RUN, f'--deepspeed_config={ZERO3}', f'--out_dir={out}', '--lr_decay_iters=10']
    first = launch([*args, '--max_iters=6'], environ=environ)
    resumed = launch([*args, '--init_from=resume'], environ=environ) if first.returncode == 0 else None
    exported = run([sys.executable, 'export.py', f'--out_dir={out}', f'--export_dir={folder / "export"}'],
                   environ=env(OMP_NUM_THREADS='1'))  # beside the ZeRO-2 run's ranks, one thread as they
    return dict(out=out, proc=first, resumed=resumed, exported=exported, export_dir=folder / 'export')


@pytest.fixture(scope='module')
def offload_runs(request, saved_run, tmp_path_factory):
    """JSON -> Future of its run's results, for the JSONs whose test runs: the ZeRO-3 run's two launches
    beside the ZeRO-2 run's one (a launch keeps both cores busy only while its ranks run)."""
    folder = tmp_path_factory.mktemp('offload')
    running = {item.name for item in request.session.items if item.module is request.module}
    with ThreadPoolExecutor(max_workers=2) as pool:  # leaving waits for both
        yield {json: pool.submit(job, folder / json.removesuffix('.json'))
               for json, job in ((ZERO3, zero3_run), (ZERO2, zero2_run))
               if f'test_offload_trains_like_adamw_resumes_and_exports[{json}]' in running}


@pytest.mark.launches
@pytest.mark.parametrize('json', [ZERO2, ZERO3])
def test_offload_trains_like_adamw_resumes_and_exports(offload_runs, saved_run, json):
    """The same run as saved_run's (plain ZeRO-2, torch's AdamW on each rank) but for the JSON: the same
    training losses at every iteration, ZeRO-3's across its resume at iter 6, and the same evals."""
    done = offload_runs[json].result()
    out = done['out']
    ok(done['proc'])
    assert not (out.parent / 'other_ninja_ran').exists()
    assert os.path.isfile(os.path.join(sys.prefix, 'torch_extensions', 'cpu_adam', 'cpu_adam.so'))
    ran_with = checkpoints.read_client_state(str(out / 'final'))['ds_config']['zero_optimization']
    assert ran_with['offload_optimizer']['device'] == 'cpu'
    if json == ZERO3:
        assert ran_with['offload_param']['device'] == 'cpu'
        proc = ok(done['resumed'])
        assert f'resumed at iter 6 from {out / "final"}' in proc.stdout
    for key in ('loss', 'val_loss'):  # CPU Adam's update is AdamW's, to float rounding
        got, adamw = by_iter(out, key), by_iter(saved_run[0], key)
        assert sorted(got) == sorted(adamw) == (list(range(10)) if key == 'loss' else list(range(0, 11, 2)))
        for it, loss in adamw.items():
            assert abs(got[it] - loss) <= 1e-5, (key, it, got[it], loss)
    if json == ZERO2:
        return

    ok(done['exported'])  # the trained weights
    exported = torch.load(done['export_dir'] / 'ckpt.pt', map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**exported['model_args']))
    model.load_state_dict(exported['model'])
    final = [r for r in metrics(out) if 'val_loss' in r][-1]
    assert final['iter'] == 10 and abs(expected_eval(model.eval())['val'] - final['val_loss']) <= 1e-5
