"""settings.py: values of the right type that still cannot work, each named in one line with its fix before
anything starts. Checked on the trainer's own constants (configurator.constants_of); test_bad_inputs checks
that a command stops on such a line, once."""
import os

import pytest
from conftest import REPO

from configurator import constants_of
from nanogpt_ds import settings

TRAINER = constants_of(os.path.join(REPO, 'train_deepspeed.py'))
TINY = dict(init_from='scratch', n_layer=2, n_head=2, n_embd=64)

# the changed setting(s) -> phrases the line must hold
CANNOT_WORK = [
    (dict(max_iters=-5), ['max_iters=-5 cannot work', '--max_iters=1']),
    (dict(eval_interval=0), ['eval_interval=0', '--eval_interval=1']),
    (dict(log_interval=0), ['log_interval=0', '--log_interval=1']),
    (dict(eval_iters=0), ['eval_iters=0', '--eval_iters=1']),
    (dict(batch_size=0), ['batch_size=0', '--batch_size=1']),
    (dict(gradient_accumulation_steps=0),
     ['gradient_accumulation_steps=0', '--gradient_accumulation_steps=1']),
    (dict(block_size=0), ['block_size=0', '--block_size=1']),
    (dict(learning_rate=-1.0), ['learning_rate=-1.0', 'positive']),
    (dict(learning_rate=float('inf')), ['learning_rate=inf', 'positive']),
    (dict(n_layer=0), ['n_layer=0', '--n_layer=1']),
    (dict(n_head=-2), ['n_head=-2', '--n_head=1']),
    (dict(n_embd=65), ['n_embd=65 does not split into n_head=2 heads', '--n_embd=64']),
    (dict(warmup_iters=-1), ['warmup_iters=-1', '--warmup_iters=0']),
    (dict(keep_last_n=0), ['keep_last_n=0', '--keep_last_n=1']),
    (dict(seed=-1), ['seed=-1', '--seed=0']),
    (dict(dropout=1.0), ['dropout=1.0', 'up to (not including) 1']),
    (dict(beta2=1.5), ['beta2=1.5', 'up to (not including) 1']),
    (dict(grad_clip=-1.0), ['grad_clip=-1.0', '--grad_clip=0.0']),
    (dict(out_dir=''), ["out_dir=''", '--out_dir=out']),
    (dict(compile='yes'), ["compile='yes' cannot work", '--compile=True, False or auto']),
    (dict(dataset=' '), ["dataset=' ' names nothing", '--help']),
    (dict(wandb_log=True, wandb_project=''), ["wandb_project=''", '--wandb_project=']),
    # a setting that would do nothing where it is given
    (dict(resume_tag='iter_2'), ["resume_tag='iter_2' is read only with init_from='resume'",
                                 '--init_from=resume']),
    (dict(plan_gpus=4), ['plan_gpus=4 is read only with dry_run=True', '--dry_run=True']),
    # a schedule that cannot be meant: the cosine would climb
    (dict(min_lr=1e-3), ['min_lr=0.001 is above learning_rate=3e-05', '--min_lr, like 3e-06']),
]


def test_the_trainers_defaults_can_work():
    assert settings.problem(TRAINER) == '' and settings.problem({**TRAINER, **TINY}) == ''


@pytest.mark.parametrize('change,phrases', CANNOT_WORK, ids=[', '.join(c) for c, _ in CANNOT_WORK])
def test_a_value_that_cannot_work_is_one_line_with_its_fix(change, phrases):
    line = settings.problem({**TRAINER, **TINY, **change})
    assert '\n' not in line
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    with pytest.raises(ValueError, match=phrases[0].replace('(', r'\(').replace(')', r'\)')):
        settings.check({**TRAINER, **TINY, **change})


def test_compile_takes_true_false_or_auto():
    for value in (True, False, 'auto'):
        assert settings.problem({**TRAINER, 'compile': value}) == ''
