# Stage 0: the embedded synthetic demo dataset (only when demo.generate is true).


rule demo_data:
    output:
        marker=os.path.join(config["dataset"]["root"], "demo.json"),
    params:
        launch=launcher(0),
        root=lambda wc: config["dataset"]["root"],
        p=lambda wc: stage_params("demo"),
    log:
        f"{LOGS}/demo_data.log",
    benchmark:
        f"{BENCH}/demo_data.tsv"
    threads: 1
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    shell:
        "BESTIE_RULE={rule} {params.launch} demo-data --root {params.root:q} --params {params.p:q} > {log:q} 2>&1"
