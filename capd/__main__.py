from capd.daemon import main

main()
