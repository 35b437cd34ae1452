"""data_prep: pack ImageNet-style data into gait_ref's HDF5 shards (see gait_ref.data.shards).

    python -m data_prep imagenet SRC DST --size 64        # train/<wnid>/*.JPEG, val/
    python -m data_prep downsampled SRC DST               # Chrabaszcz et al. 32/64 px pickles
"""
