"""Training configurations, one module per config; ``medt-train --list-configs`` lists them."""
