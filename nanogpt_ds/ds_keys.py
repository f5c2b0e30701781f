"""
Which settings of a DeepSpeed JSON take effect here. DeepSpeed accepts every zero_optimization key it knows at
every stage, but each stage's code reads only its own: a ZeRO-3 setting under ZeRO-2, or an offload at stage
0, changes nothing, and whoever wrote it believes they tuned something. The tables come from DeepSpeed
0.19.8's source: runtime/engine.py _configure_zero_optimizer hands each stage's optimizer what it reads,
zero/partition_parameters.py (zero.Init, ZeRO-3 only) reads the rest. A key read at every stage, or one not
traced, is left alone.
"""
import difflib

# DeepSpeedZeroConfig's field names (a stage3_* alias counts as its field). Stage 0 builds no ZeRO optimizer
# (engine.py: _configure_zero_optimizer only when zero_enabled), so it reads none of these.
ANY_ZERO = ('offload_optimizer', 'cpu_offload', 'contiguous_gradients', 'reduce_scatter',
            'reduce_bucket_size', 'overlap_comm', 'load_from_fp32_weights', 'elastic_checkpoint')
# only ZeRO-1/2's DeepSpeedZeroOptimizer takes these (engine.py 2670-2707; allgather_bucket_size also the bf16
# optimizer of ZeRO-1, 2625): stage3.py, parameter_offload.py and zero.Init never read them
ZERO_1_2 = ('allgather_bucket_size', 'use_multi_rank_bucket_allreduce', 'round_robin_gradients',
            'parameter_alignment', 'ignore_unused_parameters', 'compute_grad_norm')
# only ZeRO-3 reads these: its optimizer and parameter offload (engine.py 2709-2795), zero.Init
# (partition_parameters.py 1080-1229), save_16bit_model (engine.py 5730), ZeRO-3 checkpoint loading (4738);
# zero_quantized_gradients' all-to-all group goes to stage 3's optimizer only (engine.py 2159, 2769)
ZERO_3 = ('offload_param', 'cpu_offload_param', 'sub_group_size', 'prefetch_bucket_size',
          'param_persistence_threshold', 'model_persistence_threshold', 'max_live_parameters',
          'max_reuse_distance', 'gather_16bit_weights_on_model_save', 'module_granularity_threshold',
          'stage3_gather_fp16_weights_on_model_save', 'use_all_reduce_for_fetch_params',
          'allgather_sequential', 'zero_hpz_partition_size', 'zero_quantized_weights',
          'zero_quantized_nontrainable_weights', 'zero_quantized_gradients', 'memory_efficient_linear',
          'override_module_apply', 'log_trace_cache_warnings', 'enable_sanity_checks',
          'save_muon_momentum_buffer_in_memory', 'pipeline_loading_checkpoint')
READ_AT = {**dict.fromkeys(ANY_ZERO, (1, 2, 3)), **dict.fromkeys(ZERO_1_2, (1, 2)),
           **dict.fromkeys(ZERO_3, (3,))}
# of offload_optimizer's own keys ZeRO-1/2 read these two, and keep the states in CPU memory even for device
# "nvme" (stage_1_and_2.py 220-222): NVMe, its paths and buffers, ratio, super_offload are ZeRO-3's
OFFLOAD_OPTIMIZER_AT_1_2 = ('device', 'pin_memory')


def refuse_unread(ds_config, stage, path):
    """ValueError, the fix in its message, for a JSON setting that nothing reads at this stage in this
    trainer, or one DeepSpeed does not know (a typo: the nearest name is offered)."""
    zero = ds_config.get('zero_optimization', {})
    refuse_unknown(zero, path)
    for key, value in zero.items():
        stages = READ_AT.get(field_name(key))
        if stages and stage not in stages and value != 'auto':  # DeepSpeed drops an "auto" (config_utils.py)
            raise ValueError(f'{path}: zero_optimization.{key} is read only under {zero_words(stages)} (this '
                             f'file says stage {stage}): remove it, or use {shipped_for(key, stages)}')
    if stage in (1, 2) and isinstance(zero.get('offload_optimizer'), dict):
        refuse_zero3_offload(zero['offload_optimizer'], stage, path)
    refuse_overridden_sections(ds_config, path)


def refuse_zero3_offload(offload, stage, path):
    """An offload_optimizer setting of ZeRO-3's under ZeRO-1/2."""
    where, fix = 'zero_optimization.offload_optimizer', '--deepspeed_config=ds_config_zero3_offload.json'
    for key in offload:
        if key not in OFFLOAD_OPTIMIZER_AT_1_2:
            raise ValueError(f'{path}: {where}.{key} is read only under ZeRO-3 (this file says stage '
                             f'{stage}; ZeRO-1/2 read only its device and pin_memory): remove it, or use '
                             f'{fix}')
    if offload.get('device') == 'nvme':
        raise ValueError(f'{path}: {where}.device="nvme" offloads to NVMe only under ZeRO-3, ZeRO-{stage} '
                         f'keeps the optimizer in CPU memory (this file says stage {stage}): set "cpu", or '
                         f'use {fix}')


def refuse_overridden_sections(ds_config, path):
    """The trainer passes DeepSpeed its own optimizer and sets the learning rate itself before every step."""
    if 'optimizer' in ds_config:  # deepspeed.initialize's optimizer= overrides the JSON's (its docstring)
        raise ValueError(f'{path} has an "optimizer" section, which this trainer never uses (it gives '
                         f'DeepSpeed its own AdamW): remove it, and set --learning_rate, --weight_decay, '
                         f'--beta1, --beta2')
    if 'scheduler' in ds_config:  # DeepSpeed steps it after optimizer.step; the loop then sets the lr anew
        raise ValueError(f'{path} has a "scheduler" section, whose learning rate this trainer overwrites '
                         f'before every step: remove it, and set --learning_rate, --warmup_iters, '
                         f'--lr_decay_iters, --min_lr, --decay_lr')


def refuse_unknown(zero, path):
    """A key DeepSpeed's config classes do not have, in zero_optimization or its offload blocks. DeepSpeed
    refuses it too, but only once the model is built, with a traceback, and a dry run never asks it."""
    from deepspeed import __version__
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )
    blocks = [('zero_optimization', zero, DeepSpeedZeroConfig)]
    for name, model in (('offload_optimizer', DeepSpeedZeroOffloadOptimizerConfig),
                        ('offload_param', DeepSpeedZeroOffloadParamConfig)):
        if isinstance(zero.get(name), dict):
            blocks.append((f'zero_optimization.{name}', zero[name], model))
    for where, block, model in blocks:
        known = known_keys(model)
        for key in block:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                fix = f'did you mean {close[0]!r}?' if close else 'remove it'
                raise ValueError(f'{path}: {where}.{key} is not a setting DeepSpeed {__version__} knows: '
                                 f'{fix}')


def known_keys(model):
    """The keys a DeepSpeed config class accepts: its field names and their aliases."""
    return sorted({*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)})


def field_name(key):
    """DeepSpeedZeroConfig's field for a JSON key: 'stage3_max_live_parameters' -> 'max_live_parameters'."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    aliases = {f.alias: name for name, f in DeepSpeedZeroConfig.model_fields.items() if f.alias}
    return aliases.get(key, key)


def zero_words(stages):
    return {(3,): 'ZeRO-3', (1, 2): 'ZeRO-1 and ZeRO-2'}.get(stages, 'ZeRO-1, 2 and 3')


def shipped_for(key, stages):
    """The shipped JSON where a key is read."""
    name = 'ds_config_zero3' if stages == (3,) else 'ds_config_zero2'
    return f"--deepspeed_config={name}{'_offload' if 'offload' in key else ''}.json"
