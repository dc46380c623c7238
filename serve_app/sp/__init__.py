"""Sequence parallelism for the DiT: one denoiser replica over N GPUs of one host.

  plan.py           Z-Image's context-parallel plan on diffusers' hooks: what is sharded, padded, gathered
  attention.py      our Ulysses x ring attention processor (ring_degree > 1)
  process_group.py  joining, checking and syncing the ranks' torch.distributed group (Ray-free)
  rank_group.py     the ranks as Ray actors in the replica's placement group, driven as one `Denoiser`
"""
