// vcsim for polyvisor's tests: VMware's vCenter simulator (govmomi's simulator package, Debian
// golang-github-vmware-govmomi-dev) listening on loopback with TLS and one fixed login.  It prints the SDK URL (with that
// user and password) on one line of stdout, then serves until SIGINT or SIGTERM.
//
// Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o vcsim ./tests/hypervisors/vcsim
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback only)")
	hosts := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	clusterHosts := flag.Int("host", 3, "hosts per cluster")
	machines := flag.Int("vm", 2, "VMs per resource pool")
	username := flag.String("username", "polyvisor", "the only user name accepted")
	password := flag.String("password", "polyvisor-test", "its password")
	flag.Parse()

	model := simulator.VPX()
	model.Host = *hosts
	model.ClusterHost = *clusterHosts
	model.Machine = *machines
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.TLS = new(tls.Config)
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	server := model.Service.NewServer()
	defer server.Close()

	fmt.Println(server.URL.String())
	os.Stdout.Sync()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	<-signals
}
