"""Built-in passes: one module per pass. Adding a pass means adding its module name here (plugins use the
``compressx.passes`` entry-point group instead); nothing else is edited."""

BUILTIN_PASS_MODULES: tuple[str, ...] = (
    "compressx.passes.magnitude",
    "compressx.passes.wanda",
    "compressx.passes.sparsegpt",
    "compressx.passes.dsnot",
    "compressx.passes.lbc",
    "compressx.passes.spre",
    "compressx.passes.sr_ste",
    "compressx.passes.magnitude_finetune",
    "compressx.passes.vtw",
    "compressx.passes.fastv",
    "compressx.passes.cutdiffusion",
    "compressx.passes.multidiffusion",
    "compressx.passes.ptq_minmax",
    "compressx.passes.repq_vit",
    "compressx.passes.isvit",
)
