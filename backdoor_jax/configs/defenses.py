r"""Defense settings: one section per defense, plus the shared validation split (the defaults the library uses).

Defenses never tune on the test set: anything that needs clean data (Neural Cleanse,
Fine-Pruning, STRIP, the TV weight, unlearning) uses a seeded validation split carved
from the clean training images (``val_fraction`` or ``val_size``). The test set only
gives the reported clean accuracy / ASR / FSR. Launch commands: ``configs/defenses.py``.
"""
from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  """Returns the default defense settings."""
  c = config_dict.ConfigDict()
  c.seed = -1                 # -1: the run's seed (validation split, initialisations)
  c.val_fraction = 0.1        # of the training set, clean versions of the images
  c.val_size = 0              # > 0: this many validation images instead of val_fraction
  c.max_test = 0              # > 0: report on a seeded subset of the test set (0 = all)
  c.batch_size = 256          # images per jitted inference batch

  nc = c.neural_cleanse = config_dict.ConfigDict()
  nc.epochs = 20              # cost-schedule epochs
  nc.steps_per_epoch = 10     # Adam steps per epoch (each on a fresh batch of validation images)
  nc.batch_size = 32
  nc.lr = 0.1
  nc.init_cost = 1e-2         # weight of the mask L1 norm
  nc.cost_multiplier = 1.5    # x after `patience` successful epochs, / multiplier**1.5 after failing ones
  nc.patience = 2
  nc.attack_threshold = 0.99  # attack accuracy a reversed trigger must reach
  nc.anomaly_threshold = 2.0  # flag classes whose anomaly index (small side) exceeds it
  nc.vmap = True              # all classes at once (False: class by class, same result)
  nc.unlearn = False          # fine-tune with the reversed trigger of the most anomalous flagged class
  nc.unlearn_fraction = 0.2   # of each batch gets the reversed trigger (true labels)
  nc.unlearn_epochs = 5
  nc.unlearn_lr = 1e-4
  nc.unlearn_batch_size = 32

  ac = c.activation_clustering = config_dict.ConfigDict()
  ac.layer = ""               # '' = the last hidden (B, D) layer
  ac.reduction = "ica"        # ica / pca
  ac.n_components = 10
  ac.method = "size"          # size / silhouette
  ac.size_threshold = 0.35    # smaller cluster flagged when its relative size is below it
  ac.silhouette_threshold = 0.15
  ac.min_class_size = 10

  ss = c.spectral = config_dict.ConfigDict()
  ss.layer = ""               # '' = the last hidden (B, D) layer
  ss.expected_poison_fraction = 0.1
  ss.removal_factor = 1.5     # remove the top removal_factor * expected fraction of each class
  ss.retrain = True
  ss.retrain_epochs = 0       # 0 = the run's own number of epochs

  fp = c.fine_pruning = config_dict.ConfigDict()
  fp.layer = ""               # '' = the deepest spatial layer
  fp.step = 0.05              # pruned-fraction grid
  fp.max_fraction = 0.95
  fp.max_val_drop = 0.04      # chosen point: largest fraction within this validation-accuracy drop
  fp.finetune_epochs = 5      # on the validation split
  fp.finetune_lr = 1e-4
  fp.finetune_batch_size = 32

  st = c.strip = config_dict.ConfigDict()
  st.num_overlays = 20
  st.alpha = 0.5              # weight of the input in the blend
  st.frr = 0.1                # false-rejection rate on clean validation inputs
  st.max_inputs = 1000        # per test set (clean, triggered); 0 = all
  st.batch_size = 32          # inputs per jitted batch (x num_overlays images)

  tv = c.tv_denoise = config_dict.ConfigDict()
  tv.weights = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
  tv.iterations = 50
  tv.max_val_drop = 0.04
  return c
