# Makes this directory the package clip_train.configs inside a wheel (see setup.py and
# clip_train/config_source.py), so an installed clip_train finds its Hydra configs via pkg://.
