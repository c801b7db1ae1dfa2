# Stage 2: CAMs (with flip TTA) and, for the PAM classifier, peak points (METHOD.md section 2).


rule make_cams:
    input:
        marker=dataset_marker(),
        checkpoint=lambda wc: classifier_checkpoints(wc.kind),
    output:
        cams=f"{OUT}/cams/{{kind}}_cams.h5",
        points=f"{OUT}/cams/{{kind}}_points.h5",
        diagnostics=f"{OUT}/cams/{{kind}}_diagnostics.json",
        overlays=directory(f"{OUT}/cams/{{kind}}_overlays"),
    params:
        launch=launcher(0),
        p=lambda wc: stage_params("cams"),
        ds=lambda wc: dataset_params(),
        device=device_flag(infer_gpus()),
    log:
        f"{LOGS}/make_cams_{{kind}}.log",
    benchmark:
        f"{BENCH}/make_cams_{{kind}}.tsv"
    threads: classifier_threads()
    resources:
        gpu=infer_gpus(),
        mem_mb=4000,
        runtime=120,
    shell:
        "BESTIE_RULE={rule} {params.launch} make-cams --params {params.p:q} --dataset {params.ds:q} "
        "--checkpoint {input.checkpoint:q} --out-cams {output.cams:q} --out-points {output.points:q} "
        "--out-diagnostics {output.diagnostics:q} --overlay-dir {output.overlays:q} {params.device} > {log:q} 2>&1"
