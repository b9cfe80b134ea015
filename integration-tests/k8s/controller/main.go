// Command push-controller is a small KubeFed-style push controller for the end-to-end tests: it
// watches the ConfigMaps of one namespace in a hub cluster and makes every member cluster hold
// the same set, with the same data, by server-side apply and delete. Members are reached with
// their own kubeconfigs (in the tests: through the proxy, by the kubeconfig's proxy-url).
//
//	push-controller run --hub-kubeconfig HUB --namespace NS --member NAME=KUBECONFIG... --status-addr ADDR
//	push-controller seed --kubeconfig K --namespace NS --count N [--size BYTES] [--workers W]
//	push-controller list --kubeconfig K --namespace NS [--limit N]
//	push-controller sync --kubeconfig K --namespace NS
//
// `run` keeps a status of its own, served as JSON at http://ADDR/status and also written to
// stdout as one JSON line per event: per member, the hub resourceVersion last synced for every
// object, the propagation latency of every change (from the hub event reaching the controller to
// the member's write succeeding), errors, and the member informer's lists, watches and watch
// ends (how often its watch through the proxy had to reconnect). A member informer (on the
// objects the controller manages there) repairs drift and checks that no member ever goes back to
// an older hub resourceVersion of an object ("regressions": an out-of-order write).
//
// `seed` creates N ConfigMaps quickly (W at a time); `list` lists a namespace's ConfigMaps (one
// LIST, or pages of --limit) and prints the items, bytes and seconds it took as one JSON line;
// `sync` starts a ConfigMap informer on a namespace and prints how long its initial sync took.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"
)

const (
	fieldManager  = "push-controller"
	managedLabel  = "push-controller.test/managed"
	hubRVAnnotate = "push-controller.test/hub-resource-version"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: push-controller run|seed|list|sync [flags]"))
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = run(os.Args[2:])
	case "seed":
		err = seed(os.Args[2:])
	case "list":
		err = list(os.Args[2:])
	case "sync":
		err = informerSync(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (want run, seed, list or sync)", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "push-controller:", err)
	os.Exit(1)
}

// client builds a clientset from a kubeconfig, without client-side throttling (client-go's
// default of 5 requests per second would be what the tests measure).
func client(kubeconfig string) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = -1, 0
	cfg.UserAgent = "push-controller"
	return kubernetes.NewForConfig(cfg)
}

// emit writes one JSON line to stdout.
var stdoutMu sync.Mutex

func emit(fields map[string]any) {
	fields["t"] = time.Now().UnixMilli()
	line, _ := json.Marshal(fields)
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	os.Stdout.Write(append(line, '\n'))
}

// ---- list and watch, counted ----

// watchCounts counts what an informer's reflector does: every LIST, every WATCH started, every
// watch that ended without the reflector stopping it (the server or the network closed it) and
// every error the reflector reported.
type watchCounts struct {
	cluster                      string
	lists, watches, ends, errors atomic.Int64
}

// listWatch is the ConfigMaps of ns (selected by selector), counting into counts.
func listWatch(cs kubernetes.Interface, ns, selector string, counts *watchCounts) *cache.ListWatch {
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.LabelSelector = selector
			counts.lists.Add(1)
			emit(map[string]any{"event": "list", "cluster": counts.cluster, "rv": opts.ResourceVersion})
			return cs.CoreV1().ConfigMaps(ns).List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.LabelSelector = selector
			n := counts.watches.Add(1)
			initial := opts.SendInitialEvents != nil && *opts.SendInitialEvents
			asked := time.Now()
			w, err := cs.CoreV1().ConfigMaps(ns).Watch(ctx, opts)
			line := map[string]any{"event": "watch", "cluster": counts.cluster, "n": n, "rv": opts.ResourceVersion,
				"initial_events": initial, "took_ms": time.Since(asked).Milliseconds()}
			if err != nil {
				line["error"] = err.Error()
			}
			emit(line) // once the server has answered: "t" is when the watch was established
			if err != nil {
				return nil, err
			}
			return track(w, counts), nil
		},
	}
}

// trackedWatch passes a watch's events on and notes when the watch ends by itself.
type trackedWatch struct {
	inner watch.Interface
	out   chan watch.Event
	stop  chan struct{}
	once  sync.Once
}

func track(inner watch.Interface, counts *watchCounts) watch.Interface {
	w := &trackedWatch{inner: inner, out: make(chan watch.Event), stop: make(chan struct{})}
	started := time.Now()
	go func() {
		defer close(w.out)
		events := 0
		for ev := range inner.ResultChan() {
			select {
			case w.out <- ev:
				events++
			case <-w.stop:
				return
			}
		}
		select {
		case <-w.stop: // stopped by the reflector: not a reconnect
		default:
			counts.ends.Add(1)
			emit(map[string]any{"event": "watch_end", "cluster": counts.cluster, "events": events, "lasted_ms": time.Since(started).Milliseconds()})
		}
	}()
	return w
}

func (w *trackedWatch) Stop() {
	w.once.Do(func() {
		close(w.stop)
		w.inner.Stop()
	})
}

func (w *trackedWatch) ResultChan() <-chan watch.Event { return w.out }

// informer runs a ConfigMap informer with counted list/watch and an error handler that counts.
func informer(cs kubernetes.Interface, ns, selector string, counts *watchCounts) cache.SharedIndexInformer {
	inf := cache.NewSharedIndexInformer(listWatch(cs, ns, selector, counts), &corev1.ConfigMap{}, 0, cache.Indexers{})
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		counts.errors.Add(1)
		emit(map[string]any{"event": "watch_error", "cluster": counts.cluster, "error": err.Error()})
	})
	return inf
}

// ---- the controller ----

type synced struct {
	HubRV    string `json:"hub_rv"` // "" once deleted
	MemberRV string `json:"member_rv"`
	At       int64  `json:"at_ms"`
}

type member struct {
	name   string
	client kubernetes.Interface
	queue  workqueue.TypedRateLimitingInterface[string]
	inf    cache.SharedIndexInformer
	counts watchCounts

	mu          sync.Mutex
	pending     map[string]time.Time // key -> when the oldest unsynced hub event for it arrived
	synced      map[string]synced
	seenRV      map[string]uint64 // highest hub resourceVersion seen on the member, per key
	latencies   [][2]int64        // (unix ms when synced, latency in µs)
	applies     int64
	deletes     int64
	failures    int64
	regressions int64
	lastError   string
	lastErrorAt int64
	lastOKAt    int64
}

type controller struct {
	ns      string
	hub     cache.SharedIndexInformer
	hubWC   watchCounts
	members []*member
	timeout time.Duration
	ready   atomic.Bool
}

func run(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	hubConfig := fs.String("hub-kubeconfig", "", "kubeconfig of the hub cluster")
	ns := fs.String("namespace", "default", "the namespace whose ConfigMaps are propagated")
	statusAddr := fs.String("status-addr", "127.0.0.1:0", "where /status is served")
	workers := fs.Int("workers", 4, "concurrent syncs per member")
	timeout := fs.Duration("request-timeout", 10*time.Second, "limit of one write to a member")
	var members []string
	fs.Func("member", "NAME=KUBECONFIG of a member cluster (repeat)", func(v string) error {
		members = append(members, v)
		return nil
	})
	_ = fs.Parse(args)
	if *hubConfig == "" || len(members) == 0 {
		return errors.New("run needs --hub-kubeconfig and at least one --member")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	hubClient, err := client(*hubConfig)
	if err != nil {
		return err
	}
	c := &controller{ns: *ns, timeout: *timeout, hubWC: watchCounts{cluster: "hub"}}
	c.hub = informer(hubClient, *ns, "", &c.hubWC)
	for _, spec := range members {
		name, path, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("--member %q: want NAME=KUBECONFIG", spec)
		}
		cs, err := client(path)
		if err != nil {
			return err
		}
		m := &member{
			name:   name,
			client: cs,
			// Retries back off from 50 ms to 2 s: a member behind a restarting agent is retried
			// about every 2 s, not after minutes (client-go's default goes up to 1000 s).
			queue:   workqueue.NewTypedRateLimitingQueue(workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 2*time.Second)),
			pending: map[string]time.Time{},
			synced:  map[string]synced{},
			seenRV:  map[string]uint64{},
		}
		m.counts.cluster = name
		m.inf = informer(cs, *ns, managedLabel+"=true", &m.counts)
		c.members = append(c.members, m)
	}

	_, _ = c.hub.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: c.hubChanged,
		UpdateFunc: func(old, cur any) {
			if old.(*corev1.ConfigMap).ResourceVersion != cur.(*corev1.ConfigMap).ResourceVersion {
				c.hubChanged(cur)
			}
		},
		DeleteFunc: c.hubChanged,
	})
	for _, m := range c.members {
		_, _ = m.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { c.memberChanged(m, obj, false) },
			UpdateFunc: func(_, cur any) { c.memberChanged(m, cur, false) },
			DeleteFunc: func(obj any) { c.memberChanged(m, obj, true) },
		})
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.status())
	})
	srv := &http.Server{Addr: *statusAddr, Handler: mux}
	go func() {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fail(err)
		}
	}()

	// Every member gets its namespace (a fresh member has none).
	for _, m := range c.members {
		nsObj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: *ns}}
		for {
			_, err := m.client.CoreV1().Namespaces().Create(ctx, nsObj, metav1.CreateOptions{})
			if err == nil || apierrors.IsAlreadyExists(err) {
				break
			}
			emit(map[string]any{"event": "namespace_error", "member": m.name, "error": err.Error()})
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
		}
	}

	go c.hub.RunWithContext(ctx)
	synced := []cache.InformerSynced{c.hub.HasSynced}
	for _, m := range c.members {
		go m.inf.RunWithContext(ctx)
		synced = append(synced, m.inf.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil
	}
	for _, m := range c.members {
		for i := 0; i < *workers; i++ {
			go c.work(ctx, m)
		}
	}
	c.ready.Store(true)
	emit(map[string]any{"event": "ready"})

	<-ctx.Done()
	for _, m := range c.members {
		m.queue.ShutDown()
	}
	shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return srv.Shutdown(shutdown)
}

func keyOf(obj any) (string, bool) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	return key, err == nil
}

// hubChanged queues the object for every member, noting when the change arrived.
func (c *controller) hubChanged(obj any) {
	key, ok := keyOf(obj)
	if !ok || strings.HasSuffix(key, "/kube-root-ca.crt") {
		return
	}
	now := time.Now()
	for _, m := range c.members {
		m.mu.Lock()
		if _, waiting := m.pending[key]; !waiting {
			m.pending[key] = now
		}
		m.mu.Unlock()
		m.queue.Add(key)
	}
}

// memberChanged queues an object whose member copy differs from the hub (drift, or a write of
// ours that the hub has moved past), and counts a member going back to an older hub version.
func (c *controller) memberChanged(m *member, obj any, deleted bool) {
	key, ok := keyOf(obj)
	if !ok {
		return
	}
	hubObj, inHub, _ := c.hub.GetStore().GetByKey(key)
	if deleted {
		if inHub {
			m.queue.Add(key)
		}
		return
	}
	cm, ok := obj.(*corev1.ConfigMap)
	if !ok {
		return
	}
	rvText := cm.Annotations[hubRVAnnotate]
	if rv, err := strconv.ParseUint(rvText, 10, 64); err == nil {
		m.mu.Lock()
		if rv < m.seenRV[key] {
			m.regressions++
			emit(map[string]any{"event": "regression", "member": m.name, "key": key, "hub_rv": rv, "seen_rv": m.seenRV[key]})
		} else {
			m.seenRV[key] = rv
		}
		m.mu.Unlock()
	}
	if !inHub || hubObj.(*corev1.ConfigMap).ResourceVersion != rvText {
		m.queue.Add(key)
	}
}

func (c *controller) work(ctx context.Context, m *member) {
	for {
		key, quit := m.queue.Get()
		if quit {
			return
		}
		// Taken before the hub's state is read: an event arriving during the sync is measured
		// from its own arrival by the next sync (the queue has the key again by then).
		m.mu.Lock()
		since, waiting := m.pending[key]
		delete(m.pending, key)
		m.mu.Unlock()
		hubRV, memberRV, op, err := c.sync(ctx, m, key)
		now := time.Now()
		m.mu.Lock()
		if err != nil {
			if prev, ok := m.pending[key]; waiting && (!ok || since.Before(prev)) {
				m.pending[key] = since
			}
			m.failures++
			m.lastError, m.lastErrorAt = err.Error(), now.UnixMilli()
		} else {
			m.synced[key] = synced{HubRV: hubRV, MemberRV: memberRV, At: now.UnixMilli()}
			m.lastOKAt = now.UnixMilli()
			if op == "delete" {
				m.deletes++
			} else {
				m.applies++
			}
		}
		m.mu.Unlock()
		line := map[string]any{"event": op, "member": m.name, "key": key, "hub_rv": hubRV, "member_rv": memberRV}
		if err != nil {
			line["event"], line["error"] = "sync_error", err.Error()
			m.queue.AddRateLimited(key)
		} else {
			m.queue.Forget(key)
			if waiting {
				latency := now.Sub(since)
				m.mu.Lock()
				m.latencies = append(m.latencies, [2]int64{now.UnixMilli(), latency.Microseconds()})
				m.mu.Unlock()
				line["latency_ms"] = float64(latency.Microseconds()) / 1000
			}
		}
		emit(line)
		m.queue.Done(key)
	}
}

// sync makes the member's copy of key what the hub has now: applied, or deleted.
func (c *controller) sync(ctx context.Context, m *member, key string) (hubRV, memberRV, op string, err error) {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return "", "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	obj, exists, err := c.hub.GetStore().GetByKey(key)
	if err != nil {
		return "", "", "", err
	}
	configMaps := m.client.CoreV1().ConfigMaps(ns)
	if !exists {
		err := configMaps.Delete(ctx, name, metav1.DeleteOptions{})
		if apierrors.IsNotFound(err) {
			err = nil
		}
		return "", "", "delete", err
	}
	cm := obj.(*corev1.ConfigMap)
	labels := map[string]string{managedLabel: "true"}
	for k, v := range cm.Labels {
		labels[k] = v
	}
	apply := corev1ac.ConfigMap(name, ns).
		WithLabels(labels).
		WithAnnotations(map[string]string{hubRVAnnotate: cm.ResourceVersion}).
		WithData(cm.Data).
		WithBinaryData(cm.BinaryData)
	out, err := configMaps.Apply(ctx, apply, metav1.ApplyOptions{FieldManager: fieldManager, Force: true})
	if err != nil {
		return cm.ResourceVersion, "", "apply", err
	}
	return cm.ResourceVersion, out.ResourceVersion, "apply", nil
}

type counts struct {
	Lists       int64 `json:"lists"`
	Watches     int64 `json:"watches"`
	WatchEnds   int64 `json:"watch_ends"`
	WatchErrors int64 `json:"watch_errors"`
}

func (w *watchCounts) snapshot() counts {
	return counts{Lists: w.lists.Load(), Watches: w.watches.Load(), WatchEnds: w.ends.Load(), WatchErrors: w.errors.Load()}
}

type memberStatus struct {
	counts
	Applies     int64             `json:"applies"`
	Deletes     int64             `json:"deletes"`
	Failures    int64             `json:"failures"`
	Regressions int64             `json:"regressions"`
	Queued      int               `json:"queued"`
	Pending     int               `json:"pending"`
	LastError   string            `json:"last_error"`
	LastErrorAt int64             `json:"last_error_at_ms"`
	LastOKAt    int64             `json:"last_ok_at_ms"`
	Synced      map[string]synced `json:"synced"`
	Latencies   [][2]int64        `json:"latencies_us"`
}

type status struct {
	Ready   bool                    `json:"ready"`
	Hub     counts                  `json:"hub"`
	Members map[string]memberStatus `json:"members"`
}

func (c *controller) status() status {
	s := status{Ready: c.ready.Load(), Hub: c.hubWC.snapshot(), Members: map[string]memberStatus{}}
	for _, m := range c.members {
		m.mu.Lock()
		ms := memberStatus{
			counts:      m.counts.snapshot(),
			Applies:     m.applies,
			Deletes:     m.deletes,
			Failures:    m.failures,
			Regressions: m.regressions,
			Queued:      m.queue.Len(),
			Pending:     len(m.pending),
			LastError:   m.lastError,
			LastErrorAt: m.lastErrorAt,
			LastOKAt:    m.lastOKAt,
			Synced:      make(map[string]synced, len(m.synced)),
			Latencies:   append([][2]int64(nil), m.latencies...),
		}
		for k, v := range m.synced {
			ms.Synced[k] = v
		}
		m.mu.Unlock()
		s.Members[m.name] = ms
	}
	return s
}

// ---- seed and list ----

func seed(args []string) error {
	fs := flag.NewFlagSet("seed", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "the cluster")
	ns := fs.String("namespace", "bulk", "namespace (created if missing)")
	count := fs.Int("count", 10000, "ConfigMaps to create")
	size := fs.Int("size", 1024, "bytes of data in each")
	workers := fs.Int("workers", 16, "creates in flight")
	_ = fs.Parse(args)
	cs, err := client(*kubeconfig)
	if err != nil {
		return err
	}
	ctx := context.Background()
	started := time.Now()
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: *ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	payload := strings.Repeat("x", *size)
	next := make(chan int)
	errs := make(chan error, *workers)
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				cm := &corev1.ConfigMap{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bulk-%05d", i)},
					Data:       map[string]string{"payload": payload},
				}
				if _, err := cs.CoreV1().ConfigMaps(*ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
					errs <- err
					return
				}
			}
		}()
	}
	var firstErr error
feed:
	for i := 0; i < *count; i++ {
		select {
		case next <- i:
		case firstErr = <-errs:
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr == nil {
		select {
		case firstErr = <-errs:
		default:
		}
	}
	if firstErr != nil {
		return firstErr
	}
	emit(map[string]any{"event": "seeded", "count": *count, "seconds": time.Since(started).Seconds()})
	return nil
}

func list(args []string) error {
	fs := flag.NewFlagSet("list", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "the cluster")
	ns := fs.String("namespace", "bulk", "namespace")
	limit := fs.Int64("limit", 0, "page size (0: one LIST of everything)")
	_ = fs.Parse(args)
	cs, err := client(*kubeconfig)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	started := time.Now()
	items, bytes, pages := 0, 0, 0
	next := ""
	for {
		req := cs.CoreV1().RESTClient().Get().Namespace(*ns).Resource("configmaps")
		if *limit > 0 {
			req = req.Param("limit", strconv.FormatInt(*limit, 10))
		}
		if next != "" {
			req = req.Param("continue", next)
		}
		body, err := req.DoRaw(ctx)
		if err != nil {
			return err
		}
		var page struct {
			Metadata struct {
				Continue string `json:"continue"`
			} `json:"metadata"`
			Items []json.RawMessage `json:"items"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return err
		}
		items += len(page.Items)
		bytes += len(body)
		pages++
		next = page.Metadata.Continue
		if next == "" {
			break
		}
	}
	emit(map[string]any{"event": "listed", "items": items, "bytes": bytes, "pages": pages, "seconds": time.Since(started).Seconds()})
	return nil
}

// informerSync starts a ConfigMap informer on a namespace and prints, as one JSON line with event
// "synced", how long its initial sync took (what a controller waits for before it starts work),
// the objects it then holds, and the LISTs and WATCHes that took.
func informerSync(args []string) error {
	fs := flag.NewFlagSet("sync", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "the cluster")
	ns := fs.String("namespace", "bulk", "namespace")
	_ = fs.Parse(args)
	cs, err := client(*kubeconfig)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	counts := &watchCounts{cluster: "sync"}
	started := time.Now()
	inf := informer(cs, *ns, "", counts)
	go inf.RunWithContext(ctx)
	// Polled every millisecond: cache.WaitForCacheSync polls every 100 ms, too coarse to time.
	for !inf.HasSynced() {
		if ctx.Err() != nil {
			return errors.New("the informer did not sync within 2 minutes")
		}
		time.Sleep(time.Millisecond)
	}
	emit(map[string]any{"event": "synced", "items": len(inf.GetStore().ListKeys()), "lists": counts.lists.Load(),
		"watches": counts.watches.Load(), "seconds": time.Since(started).Seconds()})
	return nil
}
