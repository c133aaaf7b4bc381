# BF16 + TWEO
precision = 'bf16'
tweo_lambda = 0.01
