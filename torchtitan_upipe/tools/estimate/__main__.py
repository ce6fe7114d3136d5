from .estimator import main

main()
