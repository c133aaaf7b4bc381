# BF16 baseline
precision = 'bf16'
tweo_lambda = 0.0
