"""Measuring the codec: rates and where the bits go (−ELBO, IWAE, heatmaps), and baseline codecs on the same pixels."""
