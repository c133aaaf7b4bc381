# A model that 2 CPU cores train in seconds, on the demo corpus (python prepare_openwebtext.py --demo).
# The demo (make demo) and the test suite use it; the precision mode comes from --precision / --tweo_lambda.
out_dir = 'out/tiny'
data_dir = 'data/demo'
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
vocab_size = 50304
dropout = 0.0
total_batch_tokens = 1024  # 16 windows of 64 tokens per step
micro_batch_size = 8
max_iters = 60
warmup_iters = 5
lr_decay_iters = 60
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 20
eval_windows = 32
log_interval = 5
act_stats_interval = 20
ckpt_interval = 20
wandb_run_name = 'tiny'
