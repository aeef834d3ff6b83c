"""Knowledge distillation (``distill:``): a frozen teacher's softmax mixed into the training targets."""
