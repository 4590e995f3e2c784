"""`python -m kdcache.cli ...` (used by `torchrun --nproc-per-node N -m kdcache.cli train ...`)."""

from kdcache.cli.main import app

app(prog_name="kdcache")
