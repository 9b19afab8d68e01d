from tgi_server.launcher.bench.compare import main

main()
