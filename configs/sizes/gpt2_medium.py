# GPT-2 Medium (350M): Table 5 of the TWEO supplementary (24 layers, d_model 1024, 16 heads of 64).
n_layer = 24
n_embd = 1024
n_head = 16
total_batch_tokens = 524288  # 0.5M tokens per optimizer step
micro_batch_size = 16  # per GPU; lower it if you run out of memory, accumulation grows to match
learning_rate = 0.0006
min_lr = 6.0e-05  # cosine decay to 10% of the peak
activation_checkpointing = False
