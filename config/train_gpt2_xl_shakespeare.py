# The headline run: fine-tune gpt2-xl (1.56B) on Shakespeare, ZeRO-2 fp16 on 4x V100-32GB,
# about 303 ms/iter and 15-16 GB per GPU. Prepare the data first: python data/shakespeare/prepare.py
# $ deepspeed --num_gpus 4 train_deepspeed.py config/train_gpt2_xl_shakespeare.py
# Fewer or smaller GPUs: use ds_config_zero3.json, or trade batch_size for gradient_accumulation_steps.
out_dir = 'out-shakespeare-xl-deepspeed'
init_from = 'gpt2-xl'
dataset = 'shakespeare'
deepspeed_config = 'ds_config_zero2.json'
dtype = 'auto'  # fp16 on V100, bf16 on A100/H100

block_size = 1024
batch_size = 1  # micro batch per GPU
gradient_accumulation_steps = 32  # 1 x 32 x 4 GPUs = 128 sequences = 131,072 tokens per iter

max_iters = 20
eval_interval = 5
eval_iters = 20
always_save_checkpoint = False  # only when val improves: each checkpoint of gpt2-xl is ~20 GB

learning_rate = 3e-5
decay_lr = False  # a short fine-tune at a constant small learning rate
warmup_iters = 0
