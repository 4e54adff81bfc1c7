"""The launcher's quick data check before anything heavier: the first rows of every dataset, rendered and tokenized."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import Recipe
from launcher.data.read import peek_rows, recipe_sources
from launcher.data.render import Renderer, RenderStats
from launcher.data.tokenize import CHECK_ROWS, carve, encode_rows, no_samples_error
from launcher.data.tokenizer import model_vocab_size, recipe_tokenizer


def check(recipe: Recipe, rows: int = CHECK_ROWS) -> None:
    """Cheap validation in the launching process, before any run directory exists.

    Every source: exists, has a supported type, parses, and its first `rows` rows have the format's
    columns with the right types, valid chat roles, a template that renders, and (with the real tokenizer)
    pass the over-long policy. A source read to its end must keep at least one usable sample. Hub
    datasets are only named here; the ranks load them. Writes nothing.
    """
    cfg = recipe.data
    train, val = recipe_sources(cfg)  # all missing files and unsupported types first: the cheapest checks
    renderer = None
    for src in train + ([val] if val else []):
        peeked = peek_rows(src, rows)
        if peeked is None:
            continue
        got, where, complete = peeked
        if not got:
            raise UserError(f"{src.path}: the dataset is empty (no rows)")
        if renderer is None:
            renderer = Renderer(cfg, recipe_tokenizer(recipe), model_vocab_size(recipe))
        columns = {c for r in got for c in r if r.get(c) is not None}
        renderer.check_columns(sorted(columns | set(got[0])), src)
        stats = RenderStats()
        docs = encode_rows(renderer, enumerate(got), where, src.kind == "csv", stats)
        if complete and not len(docs):
            raise no_samples_error(src, cfg, stats)
        if complete and src is not val and cfg.val_fraction > 0 and val is None:
            carve(docs, cfg.val_fraction, 0, src)
