"""Training, by concern: ``options`` (what a run is: ``TrainOptions``, presets, the memory
estimate), ``run_folder`` (its lock, checkpoints and files), ``trainer`` (the steps of the
article's recipe), ``distributed`` (the process group under torchrun), ``stability`` (the
long-horizon score of a model and the guards' tests), ``damage`` (the regenerate experiment's
circles). The command line and ``train()`` are ``nca_fast.train``.
"""
