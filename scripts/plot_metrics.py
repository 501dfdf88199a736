"""Plot a training run's logged metrics as PNG files (the code: ``nemo_aligner/utils/plots.py``).

    python scripts/plot_metrics.py RUN_DIR [--out DIR] [--metrics loss,acc]

Every run also draws them at its end into ``RUN_DIR/plots/`` (needs matplotlib: ``pip install matplotlib``).
"""

from nemo_aligner.utils.plots import choose_panels, load_series, main, plot_run, read_csv, read_tensorboard  # noqa: F401

if __name__ == "__main__":
    main()
