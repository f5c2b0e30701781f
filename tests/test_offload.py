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

import pytest
import torch
from conftest import SAVED_RUN, env, expected_eval, launch, metrics, ok, run

from model import GPT, GPTConfig
from nanogpt_ds import checkpoints


def losses(out_dir):
    return {r['iter']: r['loss'] for r in metrics(out_dir) if 'loss' in r}


@pytest.mark.parametrize('json', ['ds_config_zero2_offload.json', 'ds_config_zero3_offload.json'])
def test_offload_trains_like_adamw_resumes_and_exports(tmp_path, saved_run, json):
    """The same run as saved_run's (plain ZeRO-2, torch's AdamW on each rank) but for the JSON."""
    out, other_ninja = tmp_path / 'out', tmp_path / 'bin' / 'ninja'
    other_ninja.parent.mkdir()
    other_ninja.write_text(f'#!/bin/sh\ntouch {tmp_path}/other_ninja_ran\nexit 1\n')
    other_ninja.chmod(0o755)
    path = f"{other_ninja.parent}{os.pathsep}{os.environ['PATH']}"
    ok(launch([*SAVED_RUN, f'--deepspeed_config={json}', f'--out_dir={out}'], environ=env(PATH=path)))
    assert not (tmp_path / 'other_ninja_ran').exists()
    assert os.path.isfile(os.path.join(sys.prefix, 'torch_extensions', 'cpu_adam', 'cpu_adam.so'))
    ran_with = checkpoints.read_client_state(str(out / 'final'))['ds_config']['zero_optimization']
    assert ran_with['offload_optimizer']['device'] == 'cpu'
    uninterrupted = losses(out)
    assert sorted(uninterrupted) == list(range(10))
    for it, loss in losses(saved_run[0]).items():  # CPU Adam's update is AdamW's, to float rounding
        assert abs(uninterrupted[it] - loss) <= 1e-5, (it, uninterrupted[it], loss)
    if json == 'ds_config_zero2_offload.json':
        return

    proc = ok(launch([*SAVED_RUN, f'--deepspeed_config={json}', f'--out_dir={out}', '--init_from=resume',
                      '--resume_tag=iter_6']))
    assert f'resumed at iter 6 from {out / "iter_6"}' in proc.stdout
    for it in range(6, 10):
        assert abs(losses(out)[it] - uninterrupted[it]) <= 1e-5, it

    ok(run([sys.executable, 'export.py', f'--out_dir={out}', f'--export_dir={tmp_path / "export"}']))
    exported = torch.load(tmp_path / 'export' / 'ckpt.pt', map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**exported['model_args']))
    model.load_state_dict(exported['model'])
    final = [r for r in metrics(out) if 'val_loss' in r][-1]
    assert abs(expected_eval(model.eval())['val'] - final['val_loss']) <= 1e-5  # the trained weights
