# FP8 + TWEO (tau = 3, p = 4, lambda = 0.01: the paper's setting)
precision = 'fp8'
tweo_lambda = 0.01
