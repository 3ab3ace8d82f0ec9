// probe is the local node's test program: a static binary in an image of the stack's own.
//
//	probe serve PORT    answers every HTTP request with this pod's hostname
//	probe get URL [SECONDS]  fetches URL (retrying DNS and connection errors) and prints the body
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: probe serve PORT | probe get URL [SECONDS]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintf(w, "hello from %s\n", host) })
		if err := http.ListenAndServe(":"+os.Args[2], nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "get":
		wait := 60
		if len(os.Args) > 3 {
			wait, _ = strconv.Atoi(os.Args[3])
		}
		client := http.Client{Timeout: 5 * time.Second}
		deadline := time.Now().Add(time.Duration(wait) * time.Second)
		for {
			resp, err := client.Get(os.Args[2])
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				fmt.Printf("%d %s", resp.StatusCode, body)
				if resp.StatusCode == 200 {
					return
				}
				os.Exit(1)
			}
			if time.Now().After(deadline) {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			fmt.Fprintln(os.Stderr, "retrying:", err)
			time.Sleep(time.Second)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
