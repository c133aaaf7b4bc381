# A miniature GPT for 2 CPU cores (issue 15): 8 layers, d_model 128, 2 heads of 64, on the standard
# library corpus with its compact vocabulary (python prepare_openwebtext.py --stdlib --compact_vocab).
# Chosen by bench/mini_search.py; every experiment behind it is in results/mini_search.md.
data_dir = 'data/stdlib'
vocab_size = 18784  # the corpus's 18,779 distinct GPT-2 ids (data/stdlib/meta.json), padded to a multiple of 16
n_layer = 8
n_embd = 128
n_head = 2
block_size = 256
total_batch_tokens = 1024  # 4 sequences of 256 tokens per step
micro_batch_size = 4
max_iters = 600
lr_decay_iters = 600
warmup_iters = 100
learning_rate = 0.006
min_lr = 0.0006  # cosine decay to 10% of the peak
weight_decay = 0.0  # no weight decay: the outliers grow unchecked, as the search found
activation_checkpointing = False
eval_interval = 100
eval_windows = 64
log_interval = 10
act_stats_interval = 100
ckpt_interval = 200
