# `python -m pipeline`: the webdistill CLI. The guard matters: img2dataset's multiprocessing
# uses "spawn", whose workers re-import the main module.
if __name__ == "__main__":
    from pipeline.cli import main

    main()
