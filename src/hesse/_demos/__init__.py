"""The built-in demos (see ``hesse.demo``): one module per demo."""
