# The no-GPU demo: a small character-level GPT trained from scratch on Shakespeare with DeepSpeed ZeRO-2
# on 2 CPU ranks (gloo). Under 3 minutes on a 2-core Xeon (86-147 s), val loss about 1.75.
# $ python data/shakespeare_char/prepare.py
# $ deepspeed --num_gpus 2 train_deepspeed.py config/train_shakespeare_char_cpu.py
out_dir = 'out-shakespeare-char-cpu'
init_from = 'scratch'
dataset = 'shakespeare_char'
deepspeed_config = 'ds_config_zero2.json'
dtype = 'auto'  # fp32 unless a block of this model is clearly faster in bf16 here: fp32 on every CPU so far

n_layer = 4
n_head = 4
n_embd = 96
block_size = 64
dropout = 0.0
batch_size = 32  # per rank: on 2 cores, 32 sequences a step ran 1.5x the tokens/s of 16
gradient_accumulation_steps = 1

learning_rate = 8e-3  # a small model, a short run: as high as trains smoothly
max_iters = 700
lr_decay_iters = 700
min_lr = 8e-4
warmup_iters = 30
beta2 = 0.99  # small batches of tokens: a slightly longer memory for the second moment

eval_interval = 175
eval_iters = 10
log_interval = 25
sample_max_new_tokens = 300
