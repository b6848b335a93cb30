"""The classifier stage's recipe written out by hand, the independent reference tests compare against: a centred
D-hidden-1 ReLU victim (bias on the hidden layer), full-batch SGD with weight decay on the BCE loss, and, with
``cosine``, torch's CosineAnnealingLR decaying the learning rate to 0 over the epochs."""

import torch

from recon_lightning.victim import VictimMLP, loss_fn


def train_plain_victim(x: torch.Tensor, y: torch.Tensor, hidden: int, lr: float, weight_decay: float, epochs: int,
                       cosine: bool = True, seed: int = 0) -> VictimMLP:
    torch.manual_seed(seed)  # the stage's seed (config default) before building the model
    model = VictimMLP(x.shape[1], [hidden], 2, bias=[True, False], init_scale=[None, None], center=True)
    model.input_mean.copy_(x.mean(0))
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        loss = loss_fn(model(x), y, "bce")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cosine:
            sched.step()
    return model
