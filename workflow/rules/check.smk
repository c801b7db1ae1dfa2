# Stage 0: the pre-flight checks (`bestie check`, bestie/check.py). Every stage's rule takes the report
# as an ancient() input (dataset_marker()), so all of them wait for it but none reruns because it was
# rewritten. It reruns when the config or the dataset's lists and folders change (params), reads headers
# and small files only, and lists every fault at once (results/<run>/logs/check.log) before any training.


rule check:
    input:
        demo_marker(),
    output:
        report=CHECK_REPORT,
    params:
        cfg=lambda wc: check_params(),
        fingerprint=dataset_fingerprint(),
        launch=launcher(0),
    log:
        f"{LOGS}/check.log",
    threads: 1
    resources:
        gpu=infer_gpus(),  # runs where the GPU jobs run, so that the GPU check sees their devices
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.launch} check --config {params.cfg:q} --out {output.report:q} > {log:q} 2>&1"
