export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PS1='bench# '
export DEBIAN_FRONTEND=noninteractive
cd /root
