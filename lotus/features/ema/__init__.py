"""Model EMA (``ema:``): an exponential moving average of the weights (timm's ``ModelEmaV3``), evaluated and saved."""
