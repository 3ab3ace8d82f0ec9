module instructune.local/node-images

go 1.24
