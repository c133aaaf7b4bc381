# GPT-2 Large (774M): Table 5 of the TWEO supplementary (36 layers, d_model 1280, 20 heads of 64).
n_layer = 36
n_embd = 1280
n_head = 20
total_batch_tokens = 524288  # 0.5M tokens per optimizer step
micro_batch_size = 8  # per GPU; lower it if you run out of memory, accumulation grows to match
learning_rate = 0.0003
min_lr = 3.0e-05  # cosine decay to 10% of the peak
activation_checkpointing = False
