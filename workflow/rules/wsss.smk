# Stage 3: WSSS maps from the dense CAMs, image-level supervision only (METHOD.md section 3).
# With wsss.import_png_dir set, existing maps (palette PNGs) are imported instead.


rule make_wsss:
    input:
        marker=dataset_marker(),
        cams=f"{OUT}/cams/dense_cams.h5",
        cam_diagnostics=f"{OUT}/cams/dense_diagnostics.json",
    output:
        wsss=f"{OUT}/wsss/wsss.h5",
        diagnostics=f"{OUT}/wsss/diagnostics.json",
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("wsss"),
        ds=lambda wc: dataset_params(),
        device=device_flag(infer_gpus()),
    log:
        f"{LOGS}/make_wsss.log",
    benchmark:
        f"{BENCH}/make_wsss.tsv"
    threads: workflow.cores
    resources:
        gpu=infer_gpus(),
        mem_mb=8000,
        runtime=240,
    shell:
        "BESTIE_RULE={rule} {params.launch} make-wsss --params {params.p:q} --dataset {params.ds:q} --cams {input.cams:q} "
        "--cam-diagnostics {input.cam_diagnostics:q} --out-wsss {output.wsss:q} "
        "--out-diagnostics {output.diagnostics:q} {params.device} > {log:q} 2>&1"


rule import_wsss:
    input:
        marker=dataset_marker(),
    output:
        wsss=f"{OUT}/wsss/imported.h5",
    params:
        launch=launcher(0),
        png_dir=lambda wc: config["wsss"].get("import_png_dir") or "",
        ds=lambda wc: dataset_params(),
    log:
        f"{LOGS}/import_wsss.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    shell:
        "BESTIE_RULE={rule} {params.launch} import-wsss --dataset {params.ds:q} --png-dir {params.png_dir:q} "
        "--out-wsss {output.wsss:q} > {log:q} 2>&1"
