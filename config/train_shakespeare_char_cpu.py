# The no-GPU demo: a small character-level GPT trained from scratch on Shakespeare with
# DeepSpeed ZeRO-2 on 2 CPU ranks (gloo), bf16 (about 1.5x faster than fp32 on CPUs with AVX512-BF16).
# $ python data/shakespeare_char/prepare.py
# $ deepspeed --num_gpus 2 train_deepspeed.py config/train_shakespeare_char_cpu.py
out_dir = 'out-shakespeare-char-cpu'
init_from = 'scratch'
dataset = 'shakespeare_char'
deepspeed_config = 'ds_config_zero2.json'
dtype = 'bfloat16'

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
batch_size = 16  # per rank
gradient_accumulation_steps = 1

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
warmup_iters = 100
beta2 = 0.99  # small batches of tokens: a slightly longer memory for the second moment

eval_interval = 250
eval_iters = 20
log_interval = 50
sample_max_new_tokens = 300
